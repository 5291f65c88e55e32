"""The ISP cluster's directory (issue 15, in progress: not yet deployed by any stack): the read-only
queries its mail servers run against the schema in cloud-init/files/orgmail/directory.sql.

Each query is one line, as Postfix's pgsql_table(5) `query =` and Dovecot 2.4's `query =` take it.
The servers substitute the lookup key themselves and quote it with libpq's PQescapeStringConn, so a
key always sits inside single quotes here. Postfix: %s is the key, %u its local part, %d its domain; a
query with %u and %d is not even sent for a key without a local part or without a domain (`@domain`
catch-all probes, bare local names). Dovecot: %{user} is the user name after auth_username_format.
Keys are lower-cased in SQL as well, whatever the servers' folding.

tests/unit/test_directory.py runs every query against a real PostgreSQL with the same substitution.
docs/directory.md explains them.
"""

from __future__ import annotations

import re

# The directory's CA: RDS's root certificates of the region, from AWS's trust store (Debian has none); the hosts
# fetch it over HTTPS at their first boot and verify the directory's certificate and name (sslmode verify-full).
DIRECTORY_CA_FILE = "/etc/orgmail/directory-ca.pem"


def rds_ca_bundle_url(region: str) -> str:
    return f"https://truststore.pki.rds.amazonaws.com/{region}/{region}-bundle.pem"


# Where a shard keeps its users' mail (the single host's layout: sync.py MAIL_ROOT) and as whom.
MAIL_ROOT = "/srv/mail/vmail"
VMAIL_UID = 5000

# Why a login is refused or a delivery deferred: the text a client or a sending server sees.
UNAVAILABLE = "Mailbox temporarily unavailable, try again later"

# Postfix on the edges, each map as `proxy:pgsql:/etc/postfix/orgmail/<name>.cf`. Several rows (or
# columns) come back to Postfix as one comma-separated list.
POSTFIX_QUERIES: dict[str, str] = {
    # Which domains are ours.
    "virtual_mailbox_domains": "SELECT name FROM domains WHERE name = lower('%s')",
    # Which addresses are mailboxes (a blocked one too: its mail is accepted and waits in the queue).
    "virtual_mailbox_maps": "SELECT 'OK' FROM mailboxes WHERE address = lower('%u@%d')",
    # Where an alias goes: one row per target.
    "virtual_alias_maps": "SELECT target FROM aliases WHERE source = lower('%u@%d')",
    # Who may send as an address (reject_sender_login_mismatch): the mailbox itself, and the mailboxes
    # an alias points at directly (as components/secrets.py host_config's senders).
    "smtpd_sender_login_maps": (
        "SELECT address FROM mailboxes WHERE address = lower('%u@%d') "
        "UNION SELECT a.target FROM aliases a JOIN mailboxes m ON m.address = a.target "
        "WHERE a.source = lower('%u@%d')"),
    # Submission by a blocked mailbox (check_sasl_access, keyed by the SASL login): a 4xx for every message,
    # so the client keeps it and tries again. Dovecot's `nologin` (EDGE_PASSDB) refuses IMAP and POP3
    # logins, but Postfix's SASL client does not know that field and would take the login as a success.
    # Mail of an outside sender that leaves (an alias forwarding it): through postsrsd for an SRS sender
    # (edge-main.cf, sender_dependent_default_transport_maps). Not for our domains' senders, nor for the
    # SRS senders at the MX name (`{mail_host}`, written in for the edges: for_edge), which it makes.
    "srs_forwarding": (
        "SELECT 'srsfwd:[127.0.0.1]:10027' WHERE lower('%d') <> '{mail_host}' "
        "AND NOT EXISTS (SELECT 1 FROM domains WHERE name = lower('%d'))"),
    "blocked_logins": f"SELECT '450 4.7.1 {UNAVAILABLE}' FROM mailboxes WHERE address = lower('%u@%d') AND state <> 'active'",
}

# The same relation as smtpd_sender_login_maps, for every address at once: one row per address that
# anyone may send as, with its logins comma-separated. The edges' orgmail-senders writes it to the map
# rspamd's From: check reads (cloud-init/files/rspamd/orgmail_from.lua), the single host's `senders`
# format. tests/unit/test_directory.py checks that, for every address, it answers what Postfix's query does.
SENDER_LOGINS_EXPORT = (
    "SELECT address, string_agg(login, ',' ORDER BY login) FROM ("
    "SELECT address, address AS login FROM mailboxes "
    "UNION SELECT a.source, a.target FROM aliases a JOIN mailboxes m ON m.address = a.target"
    ") s GROUP BY address ORDER BY address")

# Dovecot on the edges: IMAP, POP3 and submission logins and LMTP (lmtp_proxy = yes) look the user up
# here. The edge verifies the password against the hash itself, then proxies to the user's shard
# (`proxy`, `host`); there is no `nopassword`. A blocked mailbox answers without an error (a failed
# lookup would let Dovecot answer from an expired cache entry): a login gets `nologin` (refused after
# the password check), an LMTP delivery still goes to the shard, whose userdb defers it (4xx).
EDGE_ROUTES = "(m.state = 'active' OR '%{protocol}' = 'lmtp')"
EDGE_PASSDB = (
    "SELECT m.address AS \"user\", m.password AS password, "
    f"CASE WHEN {EDGE_ROUTES} THEN 'y' END AS proxy, "
    f"CASE WHEN {EDGE_ROUTES} THEN host(s.host) END AS host, "
    f"CASE WHEN NOT {EDGE_ROUTES} THEN 'y' END AS nologin, "
    f"CASE WHEN NOT {EDGE_ROUTES} THEN '{UNAVAILABLE}' END AS reason "
    "FROM mailboxes m JOIN shards s ON s.name = m.shard WHERE m.address = lower('%{user}')")

# Dovecot on a shard. `{shard}` is the shard's own name, written in when its configuration is rendered
# (for_shard). A shard serves only its own active mailboxes: a login for another (a blocked one, or one
# an edge's stale cache still routes here) is refused with `nologin`. Logins come through an edge, with
# the password the edge forwards, checked again here.
SHARD_REFUSES = "(m.state <> 'active' OR m.shard <> '{shard}')"
SHARD_PASSDB = (
    "SELECT m.address AS \"user\", m.password AS password, "
    f"CASE WHEN {SHARD_REFUSES} THEN 'y' END AS nologin, "
    f"CASE WHEN {SHARD_REFUSES} THEN '{UNAVAILABLE}' END AS reason "
    "FROM mailboxes m WHERE m.address = lower('%{user}')")

# Its userdb (LMTP deliveries, logins, doveadm). `tempfail` defers a delivery (451) to a mailbox this
# shard must not serve now, so the mail waits in the edges' queues instead of landing in a copy that is
# not (or no longer) the user's; Dovecot neither caches that answer nor falls back to an old one.
# doveadm (a move's sync, backups) also reaches a blocked mailbox, on either shard; nothing else does.
SHARD_SERVES = ("(m.state = 'active' AND m.shard = '{shard}') "
                "OR (m.state = 'blocked' AND '%{protocol}' = 'doveadm')")
SHARD_USERDB = (
    f"SELECT CASE WHEN {SHARD_SERVES} THEN h.home END AS home, "
    f"{VMAIL_UID} AS uid, {VMAIL_UID} AS gid, m.quota_bytes || 'B' AS quota_storage_size, "
    f"CASE WHEN NOT ({SHARD_SERVES}) THEN 'y' END AS tempfail, "
    f"CASE WHEN NOT ({SHARD_SERVES}) THEN '{UNAVAILABLE}' END AS reason "
    f"FROM mailboxes m CROSS JOIN LATERAL (SELECT '{MAIL_ROOT}/' || m.domain || '/' || "
    "split_part(m.address, '@', 1) AS home) h WHERE m.address = lower('%{user}')")

# `doveadm -A` on a shard (backups, quota recalculation): its own mailboxes.
SHARD_ITERATE = "SELECT address AS \"user\" FROM mailboxes WHERE shard = '{shard}' ORDER BY address"

DOVECOT_QUERIES: dict[str, str] = {
    "edge passdb": EDGE_PASSDB,
    "shard passdb": SHARD_PASSDB,
    "shard userdb": SHARD_USERDB,
    "shard iterate": SHARD_ITERATE,
}

# The directory's shard names (directory.sql shard_name_valid), so one is safe inside quotes.
SHARD_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")


HOST_NAME_RE = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")


def for_edge(query: str, mail_host: str) -> str:
    """An edge's query with the MX name written in."""
    if not HOST_NAME_RE.fullmatch(mail_host):
        raise ValueError(f"mail host must be a lower-case host name, got {mail_host!r}")
    return query.replace("{mail_host}", mail_host)


def for_shard(query: str, shard: str) -> str:
    """A shard's query with its own name written in."""
    if not SHARD_NAME_RE.fullmatch(shard):
        raise ValueError(f"shard name must be 1-32 of a-z, 0-9 and inner '-', got {shard!r}")
    return query.replace("{shard}", shard)
