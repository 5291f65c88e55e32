-- The ISP cluster's directory (issue 15, in progress: not yet deployed by any stack): domains,
-- mailbox shards, mailboxes and aliases, read by Postfix (proxy:pgsql) and Dovecot (sql passdb and
-- userdb) and written only by orgmail-users. docs/directory.md describes it.
--
-- Applied by `orgmail-users init`, in one transaction; applying it again changes nothing. Written for
-- PostgreSQL 15 and later (Debian 13 and Amazon RDS ship 17; the tests run 15).
--
-- Bad data is impossible here, not only in the CLI: every address and name is checked whole (an
-- anchored pattern: in PostgreSQL's regular expressions `$` matches only at the very end), and the
-- triggers keep what spans tables (an address is a mailbox or an alias source, never both; an alias
-- target in a hosted domain exists; aliases form no loop).

-- One writer at a time: init, and every directory change, hold this transaction-level lock.
SELECT pg_advisory_xact_lock(4242015);

CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY CHECK (version > 0),
    applied timestamptz NOT NULL DEFAULT now()
);

-- Domain names as components/settings.py takes them: lower-case LDH labels, an alphabetic or
-- xn-- top-level label, at most 253 characters. (The CLI also checks each xn-- label's punycode.)
CREATE TABLE IF NOT EXISTS domains (
    name text PRIMARY KEY
        CONSTRAINT domain_name_valid CHECK (
            length(name) <= 253
            AND name ~ '^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63}|xn--[a-z0-9-]{0,58}[a-z0-9])$'),
    created timestamptz NOT NULL DEFAULT now()
);

-- A mailbox backend. `host` is the address edges proxy IMAP, POP3 and LMTP to (one host, not a
-- network); `closed` keeps serving its mailboxes but gets no new ones.
CREATE TABLE IF NOT EXISTS shards (
    name text PRIMARY KEY
        CONSTRAINT shard_name_valid CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$'),
    host inet NOT NULL UNIQUE
        CONSTRAINT shard_host_is_one_address CHECK (masklen(host) = CASE family(host) WHEN 4 THEN 32 ELSE 128 END),
    state text NOT NULL DEFAULT 'active'
        CONSTRAINT shard_state_valid CHECK (state IN ('active', 'closed')),
    created timestamptz NOT NULL DEFAULT now()
);

-- Addresses: the local part as components/settings.py takes it, lower case, at most 254 characters
-- in all (RFC 5321's path limit less the angle brackets). The domain column is derived, so a
-- mailbox's or alias's domain is always a hosted domain (the foreign key).
CREATE TABLE IF NOT EXISTS mailboxes (
    address text PRIMARY KEY
        CONSTRAINT mailbox_address_valid CHECK (
            length(address) <= 254
            AND address ~ '^[a-z0-9]([a-z0-9._+-]{0,62}[a-z0-9])?@([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63}|xn--[a-z0-9-]{0,58}[a-z0-9])$'),
    domain text GENERATED ALWAYS AS (split_part(address, '@', 2)) STORED NOT NULL
        REFERENCES domains (name),
    -- A Dovecot password hash, the schemes and patterns of components/settings.py; orgmail-users
    -- itself writes only {BLF-CRYPT}.
    password text NOT NULL
        CONSTRAINT mailbox_password_is_a_hash CHECK (
            password ~ '^\{BLF-CRYPT\}\$2[aby]\$(1[0-9]|0[89]|[23][0-9])\$[./A-Za-z0-9]{53}$'
            OR password ~ '^\{SHA512-CRYPT\}\$6\$(rounds=[0-9]+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}$'
            OR password ~ '^\{ARGON2ID\}\$argon2id\$v=19\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$'),
    quota_bytes bigint NOT NULL
        CONSTRAINT mailbox_quota_positive CHECK (quota_bytes > 0),
    shard text NOT NULL REFERENCES shards (name),
    -- blocked: logins fail and deliveries are deferred (4xx: mail waits in the edges' queues).
    state text NOT NULL DEFAULT 'active'
        CONSTRAINT mailbox_state_valid CHECK (state IN ('active', 'blocked')),
    password_must_change boolean NOT NULL DEFAULT true,
    created timestamptz NOT NULL DEFAULT now(),
    changed timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS mailboxes_shard ON mailboxes (shard);
CREATE INDEX IF NOT EXISTS mailboxes_domain ON mailboxes (domain);

-- source -> target, one row per target. The source is in a hosted domain; a target is any address
-- (outside ones are forwarded), but one in a hosted domain must be a mailbox or another alias.
CREATE TABLE IF NOT EXISTS aliases (
    source text NOT NULL
        CONSTRAINT alias_source_valid CHECK (
            length(source) <= 254
            AND source ~ '^[a-z0-9]([a-z0-9._+-]{0,62}[a-z0-9])?@([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63}|xn--[a-z0-9-]{0,58}[a-z0-9])$'),
    domain text GENERATED ALWAYS AS (split_part(source, '@', 2)) STORED NOT NULL
        REFERENCES domains (name),
    target text NOT NULL
        CONSTRAINT alias_target_valid CHECK (
            length(target) <= 254
            AND target ~ '^[a-z0-9]([a-z0-9._+-]{0,62}[a-z0-9])?@([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{2,63}|xn--[a-z0-9-]{0,58}[a-z0-9])$'),
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, target),
    CONSTRAINT alias_not_to_itself CHECK (source <> target)
);
CREATE INDEX IF NOT EXISTS aliases_target ON aliases (target);
CREATE INDEX IF NOT EXISTS aliases_domain ON aliases (domain);

-- Cross-table rules. Every writer takes the directory's lock first, so two concurrent changes cannot
-- each pass a check the other would fail.
CREATE OR REPLACE FUNCTION orgmail_refuse(message text) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', message USING ERRCODE = 'integrity_constraint_violation';
END
$$;

CREATE OR REPLACE FUNCTION orgmail_mailbox_check() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(4242015);
    IF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM aliases WHERE target = OLD.address) THEN
            PERFORM orgmail_refuse(format('%s is the target of alias %s; remove the alias first',
                OLD.address, (SELECT string_agg(source, ', ' ORDER BY source) FROM aliases WHERE target = OLD.address)));
        END IF;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.address <> OLD.address THEN
        PERFORM orgmail_refuse('a mailbox address never changes; add the new one and remove the old');
    END IF;
    IF EXISTS (SELECT 1 FROM aliases WHERE source = NEW.address) THEN
        PERFORM orgmail_refuse(format('%s is already an alias; an address is either a mailbox or an alias', NEW.address));
    END IF;
    NEW.changed := now();
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION orgmail_alias_check() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(4242015);
    IF TG_OP = 'DELETE' THEN
        -- The source's last target goes: nothing may point at the source any more.
        IF NOT EXISTS (SELECT 1 FROM aliases WHERE source = OLD.source)
           AND EXISTS (SELECT 1 FROM aliases WHERE target = OLD.source) THEN
            PERFORM orgmail_refuse(format('%s is the target of alias %s; remove that alias first',
                OLD.source, (SELECT string_agg(source, ', ' ORDER BY source) FROM aliases WHERE target = OLD.source)));
        END IF;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        PERFORM orgmail_refuse('an alias never changes; remove it and add the new one');
    END IF;
    IF EXISTS (SELECT 1 FROM mailboxes WHERE address = NEW.source) THEN
        PERFORM orgmail_refuse(format('%s is already a mailbox; an address is either a mailbox or an alias', NEW.source));
    END IF;
    IF EXISTS (SELECT 1 FROM domains WHERE name = split_part(NEW.target, '@', 2))
       AND NOT EXISTS (SELECT 1 FROM mailboxes WHERE address = NEW.target)
       AND NOT EXISTS (SELECT 1 FROM aliases WHERE source = NEW.target) THEN
        PERFORM orgmail_refuse(format('target %s is in a hosted domain but is neither a mailbox nor an alias', NEW.target));
    END IF;
    IF EXISTS (WITH RECURSIVE reach (address) AS (
                   SELECT NEW.target
                   UNION
                   SELECT a.target FROM aliases a JOIN reach r ON a.source = r.address)
               SELECT 1 FROM reach WHERE address = NEW.source) THEN
        PERFORM orgmail_refuse(format('alias %s -> %s would make a loop; every alias must end in a mailbox or an outside address',
            NEW.source, NEW.target));
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION orgmail_domain_check() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(4242015);
    IF TG_OP = 'UPDATE' AND NEW.name <> OLD.name THEN
        PERFORM orgmail_refuse('a domain name never changes; add the new one');
    END IF;
    -- Aliases forward to addresses in the new domain: those would become unknown local users.
    IF EXISTS (SELECT 1 FROM aliases WHERE split_part(target, '@', 2) = NEW.name) THEN
        PERFORM orgmail_refuse(format('aliases forward to %s, which would then be local addresses without a mailbox: %s',
            NEW.name, (SELECT string_agg(DISTINCT target, ', ') FROM aliases WHERE split_part(target, '@', 2) = NEW.name)));
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION orgmail_shard_check() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.name <> OLD.name THEN
        PERFORM orgmail_refuse('a shard name never changes');
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER mailboxes_check BEFORE INSERT OR UPDATE OR DELETE ON mailboxes
    FOR EACH ROW EXECUTE FUNCTION orgmail_mailbox_check();
CREATE OR REPLACE TRIGGER aliases_check BEFORE INSERT OR UPDATE ON aliases
    FOR EACH ROW EXECUTE FUNCTION orgmail_alias_check();
-- After the row is gone, so that the check sees whether the source has targets left.
CREATE OR REPLACE TRIGGER aliases_delete_check AFTER DELETE ON aliases
    FOR EACH ROW EXECUTE FUNCTION orgmail_alias_check();
CREATE OR REPLACE TRIGGER domains_check BEFORE INSERT OR UPDATE ON domains
    FOR EACH ROW EXECUTE FUNCTION orgmail_domain_check();
CREATE OR REPLACE TRIGGER shards_check BEFORE UPDATE ON shards
    FOR EACH ROW EXECUTE FUNCTION orgmail_shard_check();

-- Edges and shards cache each mailbox's answer (Dovecot's auth cache, 5 minutes). Every change a login
-- or a delivery depends on is announced when it commits, on channel orgmail_auth: the address, or '*'
-- when a shard's address changes (every mailbox on it routes elsewhere). orgmail-authflush on each
-- edge and shard listens and flushes it from its cache. A new mailbox too: an earlier lookup may have
-- cached it as unknown.
CREATE OR REPLACE FUNCTION orgmail_auth_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'shards' THEN
        PERFORM pg_notify('orgmail_auth', '*');
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('orgmail_auth', OLD.address);
    ELSE
        PERFORM pg_notify('orgmail_auth', NEW.address);
    END IF;
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER mailboxes_auth_changed AFTER INSERT OR UPDATE OR DELETE ON mailboxes
    FOR EACH ROW EXECUTE FUNCTION orgmail_auth_changed();
CREATE OR REPLACE TRIGGER shards_auth_changed AFTER UPDATE ON shards
    FOR EACH ROW WHEN (OLD.host IS DISTINCT FROM NEW.host) EXECUTE FUNCTION orgmail_auth_changed();

-- Roles for the login roles the stack will make: orgmail_reader for Postfix and Dovecot (read only),
-- orgmail_writer for orgmail-users' day-to-day commands (rows only: it cannot change the schema; `init`
-- runs as the database's owner).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'orgmail_reader') THEN
        CREATE ROLE orgmail_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'orgmail_writer') THEN
        CREATE ROLE orgmail_writer NOLOGIN;
    END IF;
END
$$;
GRANT SELECT ON domains, shards, mailboxes, aliases, schema_version TO orgmail_reader;
GRANT SELECT ON schema_version TO orgmail_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON domains, shards, mailboxes, aliases TO orgmail_writer;

INSERT INTO schema_version (version) VALUES (1) ON CONFLICT (version) DO NOTHING;
