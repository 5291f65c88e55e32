#!/usr/bin/python3
"""orgmail-sync: apply this stack's SSM parameters to the host; reload only what changed.

Reads every parameter under $SSM_PATH (one path per stack, the only one the instance role may
read), writes Postfix maps, the Dovecot users file, the DKIM key and the ACME challenge key,
then reloads the services whose inputs changed; a reload that fails stays pending and is retried at
every run until it succeeds. Then grows the mail volume's file system to the volume's size
(orgmail-volume grow). With --boot it only writes files (the bootstrap starts the services
afterwards) and retries while the network comes up. It comes with the host's bundle
(orgmail-unbundle writes it at the first boot).
With --cluster (a cluster host: edge, shard or outbound relay) it applies only what its role's config
holds for it: admin.sshCidrs, and on a relay orgmail:outbound with SES's credentials.
"""

import fcntl
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENV_FILE = Path("/etc/orgmail/host.env")
STATUS = Path("/var/lib/orgmail/sync-status.json")
LAST_OK = Path("/var/lib/orgmail/sync-ok")
# One run at a time: the timer's and an administrator's would write and reload the same files at once.
LOCK = Path("/run/lock/orgmail-sync.lock")
VMAIL_UID = 5000
MAIL_ROOT = "/srv/mail/vmail"


def host_env() -> dict:
    env = {}
    for line in ENV_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def fetch(env: dict, names: tuple = ()) -> dict:
    """Every parameter under $SSM_PATH, or (relays: SSM_READ) only under the sub-paths it names, or
    only under `names`."""
    prefix = env["SSM_PATH"].rstrip("/") + "/"
    names = names or tuple(n for n in env.get("SSM_READ", "").split() if not n.startswith("bundle/"))
    paths = [prefix + name for name in names] or [env["SSM_PATH"]]
    raw = {}
    for path in paths:
        cmd = ["aws", "ssm", "get-parameters-by-path", "--path", path, "--recursive",
               "--with-decryption", "--region", env["REGION"], "--output", "json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"aws ssm get-parameters-by-path {path} failed: {proc.stderr.strip()[-400:]}")
        raw.update({p["Name"][len(prefix):]: p["Value"] for p in json.loads(proc.stdout)["Parameters"]})
    return join_parts(raw)


def join_parts(raw: dict) -> dict:
    """Values too big for one parameter come as NAME/part-000, part-001, ...; "-" marks an unused part."""
    params = {k: v for k, v in raw.items() if "/part-" not in k}
    for key in sorted(k for k in raw if "/part-" in k):
        name = key.rsplit("/part-", 1)[0]
        if raw[key] != "-":
            params[name] = params.get(name, "") + raw[key]
    return params


def write(path: str, content: str, mode: int = 0o644, owner: tuple = (0, 0)) -> bool:
    """Atomically write `content` to `path`; True when the file changed."""
    target = Path(path)
    if target.exists() and target.read_text() == content:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".orgmail-new")
    tmp.unlink(missing_ok=True)
    # Born with its final mode and owner: a secret is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        f.write(content)
    os.replace(tmp, target)
    return True


def lines(rows) -> str:
    return "".join(f"{row}\n" for row in rows)


def group_id(name: str) -> int:
    import grp
    return grp.getgrnam(name).gr_gid


def refuse_incomplete(env: dict, params: dict) -> None:
    """Fail closed: without the password hashes every login would fail. Write nothing instead."""
    config = json.loads(params["config"])
    if env["ROLE"] == "mailbox" and config["mailboxes"] and not json.loads(params.get("mailbox-passwords") or "{}"):
        raise RuntimeError("mailboxes exist but their password hashes (mailbox-passwords) are missing: nothing written")


# Which service reads a host file that comes through SSM (files/<role>).
RELOAD_BY_PREFIX = (("/etc/postfix/", "postfix"), ("/etc/rspamd/", "rspamd"), ("/etc/fail2ban/", "fail2ban"),
                    ("/etc/orgmail/webmail/", "webmail"))


# What Dovecot's global Sieve scripts may use beyond a personal script (sieve_global_extensions).
SIEVE_GLOBAL_EXTENSIONS = "+vnd.dovecot.pipe +vnd.dovecot.environment +imapsieve"


def compile_sieve(path: str) -> None:
    """Compile a global Sieve script beside itself, as root: Dovecot's mail processes run as vmail
    and could not save the binary there, so they would compile it again at every delivery."""
    script, binary = Path(path), Path(path).with_suffix(".svbin")
    if binary.exists() and binary.stat().st_mtime >= script.stat().st_mtime:
        return
    # -c: the file's settings (its sieve_plugins), not those of a running Dovecot: at boot that is
    # still the package's configuration.
    proc = subprocess.run(["sievec", "-c", "/etc/dovecot/dovecot.conf", "-x", SIEVE_GLOBAL_EXTENSIONS, path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sievec {path} failed: {(proc.stdout + proc.stderr).strip()[-400:]}")


QUOTA_RECIPIENTS = "/etc/postfix/orgmail/quota_recipients"


# Users' own passwords (set in webmail through orgmail-passwd), on the mail volume: a new instance and a
# restore keep them. Each with a fingerprint of the configured hash it replaced.
OWN_PASSWORDS = Path("/srv/mail/orgmail/passwords.json")
# Users whose password is still the configured one, while orgmail:webmail.requirePasswordChange holds:
# Dovecot lets them in from webmail only (orgmail-passdb.lua).
INITIAL = "/etc/dovecot/orgmail-initial"


def fingerprint(configured_hash: str) -> str:
    import hashlib
    return hashlib.sha256(configured_hash.encode()).hexdigest()


def own_passwords() -> dict:
    try:
        return json.loads(OWN_PASSWORDS.read_text())
    except FileNotFoundError:
        return {}


def current_own_passwords(own: dict, hashes: dict) -> dict:
    """The users' own passwords that still hold: each replaced the hash the configuration still gives.
    A new hash in the configuration is the admin's reset: the configured one applies again."""
    return {a: e for a, e in own.items() if a in hashes and e.get("replaces") == fingerprint(hashes[a])}


UNLIMITED_FIELD = "userdb_quota_ignore=yes"


def dovecot_users(mailboxes: list, hashes: dict, own: dict | None = None, require_change: bool = False) -> tuple:
    """Dovecot's users file, Postfix's map of the recipients whose quota is checked at RCPT
    (main.cf: orgmail_quota_check), and the users whose password is still the configured one (when a
    change is required). Only mailboxes with a quota are in the map: an unlimited one is never full,
    and each check costs Dovecot a user lookup and login. Mailboxes without a password yet are in
    neither (not Dovecot users: quota-status would answer "no such user")."""
    own = current_own_passwords(own or {}, hashes)
    users, checked, initial = [], [], []
    for m in mailboxes:
        address = m["address"]
        if m.get("sharedWith"):
            hashed = ""  # a shared mailbox: a user for delivery, never a login (orgmail-passdb.lua)
        elif address in own:
            hashed = own[address]["hash"]
        elif address in hashes:
            hashed = hashes[address]
            if require_change:
                initial.append(address)
        else:
            continue  # no password yet: mail is delivered, login is impossible
        local, domain = address.split("@")
        # An unlimited mailbox is left out of the quota: Dovecot would otherwise count every folder of it after
        # each delivery for warnings that can never fire (the quota root's 80 and 95 % of no limit).
        extra = f"userdb_quota_storage_size={m['quota']}" if m.get("quota") else UNLIMITED_FIELD
        users.append(f"{address}:{hashed}:{VMAIL_UID}:{VMAIL_UID}::{MAIL_ROOT}/{domain}/{local}::{extra}")
        if m.get("quota"):
            checked.append(f"{address.lower()} orgmail_quota_check")
    return lines(users), lines(checked), lines(initial)


SHARED_CONF = "/etc/dovecot/orgmail-shared.conf"
SHARED_PREFIX = "Shared/"  # each shared mailbox's namespace is SHARED_PREFIX<address>/ (report.py skips it)
# Everything but the right to change the ACL itself (a): list, read, flag, \Seen, \Deleted, insert,
# post, expunge, create and delete folders.
SHARED_RIGHTS = "lrwstipekx"


def shared_namespaces(mailboxes: list) -> str:
    """Dovecot's configuration for the shared mailboxes (dovecot.conf includes it): each one a public
    namespace Shared/<address>/ over its owner's mail (sdbox), listed only to the users it is shared with
    (list = children) and not announced to anyone (hidden), its rights given in the configuration
    alone. Empty when nothing is shared: the ACL plugin then costs no delivery or login anything."""
    shared = [m for m in mailboxes if m.get("sharedWith")]
    if not shared:
        return ""
    out = ["# Written by orgmail-sync from orgmail:mailboxes[].sharedWith.",
           "mail_plugins {", "  acl = yes", "}", "acl_driver = vfile",
           "# No dovecot-acl files are read in users' own folders: rights come from here only.",
           "acl_globals_only = yes"]
    for m in shared:
        local, domain = m["address"].split("@")
        out += [f'namespace "{SHARED_PREFIX}{m["address"]}" {{', "  type = public", "  separator = /",
                f"  prefix = {SHARED_PREFIX}{m['address']}/", f"  mail_path = {MAIL_ROOT}/{domain}/{local}/mail",
                "  subscriptions = no", "  list = children", "  hidden = yes",
                # Without a list index here: Dovecot 2.4 answers STATUS from the list index without opening the
                # mailbox, so its ACL check (made at opening) never runs and anyone could count the messages.
                "  mailbox_list_index = no",
                # A folder a user creates here inherits the namespace's rights (no file of its own is needed).
                "  acl_globals_only = no",
                # A public namespace has no INBOX of its own: the owner's is listed only when told to.
                "  mailbox INBOX {", "    auto = create", "  }"]
        out += [line for member in m["sharedWith"]
                for line in (f"  acl user={member} {{", f"    rights = {SHARED_RIGHTS}", "  }")]
        out.append("}")
    return lines(out)


def apply_files(files: dict, changed: set) -> None:
    """Write the host files orgmail delivers through SSM; add the services that must reload to `changed`."""
    for path, spec in sorted(files.items()):
        if write(path, spec["content"], int(spec["mode"], 8)):
            changed.update(service for prefix, service in RELOAD_BY_PREFIX if path.startswith(prefix))
        if path.endswith(".sieve"):
            compile_sieve(path)


def apply(env: dict, params: dict, changed: set) -> None:
    """Write every derived file; add the services that must reload to `changed` as it goes, so that
    what was written before an error is reloaded all the same."""
    config = json.loads(params["config"])
    apply_files(json.loads(params.get(f"files/{env['ROLE']}") or "{}"), changed)
    domains = config["domains"]
    if write("/etc/postfix/orgmail/domains", lines(domains)):
        changed.add("postfix")

    if env["ROLE"] == "mailbox":
        mailboxes = config["mailboxes"]
        hashes = json.loads(params.get("mailbox-passwords", "{}"))
        if write("/etc/postfix/orgmail/mailboxes", lines(f"{m['address']} OK" for m in mailboxes)):
            changed.add("postfix")
        aliases = {a: ",".join(t) for a, t in config["aliases"].items()}
        if write("/etc/postfix/orgmail/aliases", lines(f"{a} {t}" for a, t in sorted(aliases.items()))):
            changed.add("postfix")
        # Also rspamd's From: check map (lua.local.d/orgmail_from.lua): the same senders as Postfix's.
        if write("/etc/postfix/orgmail/senders",
                 lines(f"{a.lower()} {','.join(logins)}" for a, logins in sorted(config["senders"].items()))):
            changed |= {"postfix", "rspamd"}
        webmail = config.get("webmail")
        own = own_passwords()
        users, quota_recipients, initial = dovecot_users(
            mailboxes, hashes, own, bool(webmail and webmail.get("requirePasswordChange")))
        # Dovecot reads the files at each lookup; its auth cache still knows the old passwords: flush it.
        if write(INITIAL, initial, 0o640, (0, group_id("dovecot"))):
            changed.add("dovecot-auth")
        if write("/etc/dovecot/orgmail-users", users, 0o640, (0, group_id("dovecot"))):
            changed.add("dovecot-auth")
        kept = current_own_passwords(own, hashes)
        if kept != own:  # reset by the admin, or the mailbox is gone
            write(str(OWN_PASSWORDS), json.dumps(kept, indent=1, sort_keys=True) + "\n", 0o600)
        if write(QUOTA_RECIPIENTS, quota_recipients):
            changed.add("postfix")
        # A restart, not a reload: Dovecot 2.4.1's master crashed (SIGSEGV) reloading a configuration whose
        # shared namespaces were gone (seen in the booted test). IMAP clients reconnect.
        if write(SHARED_CONF, shared_namespaces(mailboxes), 0o640, (0, group_id("dovecot"))):
            changed.add("dovecot-restart")

        selector = params.get("dkim-selector", "").strip()  # set once the selector's DNS records exist
        key = params.get(f"dkim/{selector}") if selector else None
        if key:
            rspamd_gid = group_id("_rspamd")
            Path("/var/lib/rspamd/dkim").mkdir(parents=True, exist_ok=True)
            if write(f"/var/lib/rspamd/dkim/{selector}.key", key.rstrip("\n") + "\n", 0o640, (0, rspamd_gid)):
                changed.add("rspamd")
            if write("/etc/rspamd/orgmail/dkim_selectors.map", lines(f"{d} {selector}" for d in domains)):
                changed.add("rspamd")
        # postsrsd's key (SRS addresses of forwarded mail), the same across replacements.
        srs = params.get("srs-secret")
        if srs and write("/etc/postsrsd.secret", srs.strip() + "\n", 0o600):
            changed.add("postsrsd")
        # Only senders with an @ outside our domains: the null sender (looked up as "<>", quoted) never.
        forwarding = [d.replace(".", "\\.") for d in [*domains, config["mailHost"]]]
        if write("/etc/postfix/orgmail/forwarding",
                 f"if /@/\n!/@({'|'.join(forwarding)})$/ srsfwd:[127.0.0.1]:10027\nendif\n"):
            changed.add("postfix")
        restic = params.get("backup/restic-password")  # orgmail-backup's repository key
        if restic:
            write("/etc/orgmail/restic-password", restic.rstrip("\n") + "\n", 0o600)
        keep = config.get("backup", {})
        write("/etc/orgmail/backup.env", lines(f"KEEP_{k[4:].upper()}={int(v)}" for k, v in sorted(keep.items())))
        changed |= apply_relay_clients(config.get("relayHosts", []), params.get("relay-addresses"))
        apply_outbound(config, params, changed)
        apply_webmail(config, params, changed, "--boot" in sys.argv)
    else:
        if write("/etc/postfix/orgmail/recipients", lines(f"{r} OK" for r in config["recipients"])):
            changed.add("postfix")
        transport = lines(f"{d} relay:[{config['mailHost']}]:25" for d in domains)
        if write("/etc/postfix/orgmail/transport", transport):
            changed.add("postfix")

    key = params.get(f"certbot/{env['HOSTNAME']}/key")  # only this host's: see orgmail-acme-hook
    if key and config.get("acmeUrl"):
        acme = {"url": config["acmeUrl"], "host": env["HOSTNAME"], "key": key.strip()}
        write("/etc/orgmail/acme.json", json.dumps(acme) + "\n", 0o600)

    # Never banned: this host, the stack's other hosts (by name, and the relays by their published
    # Elastic IPs) and admin.trustedNetworks.
    published = relay_addresses(config.get("relayHosts", []), params.get("relay-addresses")) or []
    trusted = ["127.0.0.1/32", "::1", *config.get("trustedNetworks", []), config["mailHost"],
               *config.get("relayHosts", []), *published]
    if write("/etc/fail2ban/jail.d/orgmail-trusted.local", f"[DEFAULT]\nignoreip = {' '.join(trusted)}\n"):
        changed.add("fail2ban")

    apply_dqs(params, changed)
    changed |= apply_admin(env, config)
    apply_limits(env["ROLE"], config, changed)


def apply_limits(role: str, config: dict, changed: set) -> None:
    """orgmail:rateLimits: Postfix's per-client limits and message size (postconf), and on the hosts whose rspamd
    takes submissions (the mailbox host, a cluster's edges) the per-login hourly buckets."""
    limits = postfix_limits(role, config["postfixLimits"])
    current = subprocess.run(["postconf", "-h", *limits], capture_output=True, text=True, check=True).stdout.split("\n")
    wanted = [str(limits[k]) for k in limits]
    if current[: len(wanted)] != wanted:
        subprocess.run(["postconf", "-e", *(f"{k}={v}" for k, v in limits.items())], check=True)
        changed.add("postfix")
    if role in ("mailbox", "edge") and write("/etc/rspamd/orgmail/user_rates.inc", user_rates(config["userLimits"])):
        changed.add("rspamd")


ADMIN_ENV = "/etc/orgmail/admin.env"
SSH_SETS = "/etc/orgmail/nftables.d/ssh.nft"
SSHD_JAIL = "/etc/fail2ban/jail.d/orgmail-sshd.local"
UPGRADES = "/etc/apt/apt.conf.d/52orgmail-unattended-upgrades"


def apply_admin(env: dict, config: dict) -> set:
    """Day-2 settings that once lived in user-data (a change replaced the host): admin.email (root's
    mail on the mailbox host, certbot's contact), admin.sshCidrs (nftables sets, fail2ban's sshd jail), upgrades.* (this host's reboot time)."""
    admin, upgrades = config["admin"], config["upgrades"]
    changed = set()
    if write("/etc/aliases", system_aliases(env["ROLE"], config)):
        subprocess.run(["newaliases"], check=True)
    write(ADMIN_ENV, f"ADMIN_EMAIL={admin['email']}\n")
    if write(SSH_SETS, ssh_sets(admin["sshCidrs"])):
        changed.add("nftables")
    if write(SSHD_JAIL, sshd_jail(admin["sshCidrs"])):
        changed.add("fail2ban")
    write(UPGRADES, unattended_upgrades(upgrades["autoReboot"], upgrades["rebootTimes"][env["HOSTNAME"]]))
    return changed


def apply_dqs(params: dict, changed: set) -> None:
    """Spamhaus's Data Query Service with the stack's key (orgmail:spamhausDqsKey), else the public
    zones through the host's own resolver. The key never reaches a client: postscreen replies
    with the public zone's name (postscreen_dnsbl_reply_map)."""
    dqs = (params.get("spamhaus/dqs-key") or "").strip()
    zen = f"{dqs}.zen.dq.spamhaus.net" if dqs else "zen.spamhaus.org"
    if write("/etc/postfix/orgmail/dnsbl_reply", f"{zen} zen.spamhaus.org\n" if dqs else "", 0o640):
        changed.add("postfix")
    if subprocess.run(["postconf", "-h", "orgmail_zen"], capture_output=True, text=True).stdout.strip() != zen:
        subprocess.run(["postconf", "-e", f"orgmail_zen={zen}"], check=True)
        changed.add("postfix")
    rbl = (f'rbls {{\n  spamhaus {{ rbl = "{dqs}.zen.dq.spamhaus.net"; }}\n'
           f'  "DBL" {{ rbl = "{dqs}.dbl.dq.spamhaus.net"; }}\n}}\n') if dqs else ""
    if write("/etc/rspamd/local.d/rbl.conf", rbl, 0o640, (0, group_id("_rspamd"))):
        changed.add("rspamd")


def apply_cluster(env: dict, params: dict, changed: set) -> None:
    """A cluster host's day-2 settings from its role's config: admin.sshCidrs (nftables; on an edge, whose
    fail2ban reads the journal, its sshd jail too), on an edge the Spamhaus DQS key and rateLimits, on an outbound relay
    orgmail:outbound, and on a shard or relay upgrades.* (its own reboot time)."""
    config = json.loads(params["config"])
    cidrs = config["admin"]["sshCidrs"]
    if write(SSH_SETS, ssh_sets(cidrs)):
        changed.add("nftables")
    if env["ROLE"] == "edge":
        if write(SSHD_JAIL, sshd_jail(cidrs)):
            changed.add("fail2ban")
        apply_dqs(params, changed)
        apply_limits("edge", config, changed)
    if env["ROLE"] == "relay":
        apply_outbound(config, params, changed)
    if env["ROLE"] != "edge":  # an edge is replaced (new instances upgrade first), never rebooted
        upgrades = config["upgrades"]
        at = upgrades["rebootTimes"].get(env.get("HOSTNAME"), upgrades["rebootTime"])
        write(UPGRADES, unattended_upgrades(upgrades["autoReboot"], at))


def system_aliases(role: str, config: dict) -> str:
    """/etc/aliases: the host's role addresses to root, root to the admin. A relay sends nothing outside
    itself: its root is the mailbox host's, whose alias names the admin."""
    root = config["admin"]["email"] if role == "mailbox" else f"root@{config['mailHost']}"
    return lines(["postmaster: root", "abuse: root", "MAILER-DAEMON: postmaster", f"root: {root}"])


def ssh_sets(cidrs: list) -> str:
    """Elements of nftables.conf's ssh4 and ssh6 sets; nothing: no SSH."""
    rows = ["flush set inet orgmail ssh4", "flush set inet orgmail ssh6"]
    for family, name in ((False, "ssh4"), (True, "ssh6")):
        nets = [c for c in cidrs if (":" in c) == family]
        if nets:
            rows.append(f"add element inet orgmail {name} {{ {', '.join(nets)} }}")
    return lines(rows)


def sshd_jail(cidrs: list) -> str:
    """Debian enables fail2ban's sshd jail, which reads the journal; every jail that does wakes for every
    line written, a delivery's too. Only where SSH is reachable (admin.sshCidrs)."""
    return lines(["[sshd]", f"enabled = {'true' if cidrs else 'false'}"])


def unattended_upgrades(auto_reboot: bool, reboot_time: str) -> str:
    return lines([
        "// Security updates only, written by orgmail-sync.",
        "Unattended-Upgrade::Origins-Pattern {",
        '  "origin=Debian,codename=${distro_codename}-security,label=Debian-Security";',
        "};",
        f'Unattended-Upgrade::Automatic-Reboot "{"true" if auto_reboot else "false"}";',
        f'Unattended-Upgrade::Automatic-Reboot-Time "{reboot_time}";',
        'Unattended-Upgrade::Remove-Unused-Dependencies "true";',
        'APT::Periodic::Update-Package-Lists "1";',
        'APT::Periodic::Unattended-Upgrade "1";',
    ])


SSM_AGENT_URL = "https://s3.{region}.amazonaws.com/amazon-ssm-{region}/latest/debian_{arch}/amazon-ssm-agent.deb"


def apply_ssm_agent(env: dict, wanted: bool) -> None:
    """admin.ssm: Debian's AMI has no SSM agent; install AWS's package when Session Manager is on, stop it
    when off. Never fails the sync: a host without the agent still serves mail."""
    unit = "amazon-ssm-agent.service"
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "amazon-ssm-agent"],
                               capture_output=True, text=True).stdout.endswith(" installed")
    if not wanted:
        if installed:
            subprocess.run(["systemctl", "disable", "--now", unit], capture_output=True)
        return
    if not installed:
        arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
        url = SSM_AGENT_URL.format(region=env["REGION"], arch=arch)
        deb = "/tmp/amazon-ssm-agent.deb"
        ok = (subprocess.run(["curl", "-fsS", "--max-time", "120", "-o", deb, url]).returncode == 0
              and subprocess.run(["dpkg", "-i", deb]).returncode == 0)
        Path(deb).unlink(missing_ok=True)
        if not ok:
            print(f"orgmail-sync: warning: could not install the SSM agent from {url}; Session Manager unavailable",
                  file=sys.stderr)
            return
    if (subprocess.run(["systemctl", "is-enabled", "--quiet", unit]).returncode != 0
            and subprocess.run(["systemctl", "enable", "--now", unit]).returncode != 0):
            print("orgmail-sync: warning: SSM agent installed but not started", file=sys.stderr)


RELAYHOST_MAP = "/etc/postfix/orgmail/relayhost"
SASL_PASSWORDS = "/etc/postfix/orgmail/sasl_passwd"
TLS_POLICY = "/etc/postfix/orgmail/tls_policy"


def outbound_maps(config: dict, params: dict) -> dict:
    """orgmail:outbound: the Postfix maps that send mail from our domains, the host's own and bounces
    (the null sender) through SES's SMTP endpoint, or none of them ("direct"). The relay map only
    ever comes with its credentials: SES refuses mail without a login (530), which would bounce."""
    outbound = config.get("outbound") or {"relay": "direct"}
    if outbound.get("relay", "direct") == "direct":
        return {RELAYHOST_MAP: "", SASL_PASSWORDS: "", TLS_POLICY: ""}
    if outbound["relay"] != "ses":
        raise RuntimeError(f"outbound.relay {outbound['relay']!r} is not known here: nothing changed")
    if not params.get("ses/smtp"):
        for path in (RELAYHOST_MAP, SASL_PASSWORDS, TLS_POLICY):  # Postfix starts, as "direct", until they come
            if not Path(path).exists():
                write(path, "", 0o600 if path == SASL_PASSWORDS else 0o644)
        raise RuntimeError("outbound.relay is ses but its SMTP credentials (ses/smtp) are missing: nothing changed")
    login = json.loads(params["ses/smtp"])
    nexthop = f"[{outbound['host']}]:{int(outbound['port'])}"
    ours = "|".join(d.replace(".", "\\.") for d in sorted({*config["domains"], config["mailHost"]}))
    # Forwarded mail keeps its outside From:, which SES refuses (only verified identities): its SRS
    # sender makes Postfix deliver it itself (DUNNO: no relay host). The null sender is looked up as <>.
    relay = lines(["/^SRS[01][-+=]/ DUNNO", f"/^<>$/ {nexthop}", f"/@({ours})$/ {nexthop}"])
    return {RELAYHOST_MAP: relay,
            SASL_PASSWORDS: f"{nexthop} {login['username']}:{login['password']}\n",
            TLS_POLICY: f"{nexthop} secure match=nexthop\n"}


def apply_outbound(config: dict, params: dict, changed: set) -> None:
    for path, content in outbound_maps(config, params).items():
        if write(path, content, 0o600 if path == SASL_PASSWORDS else 0o644):
            changed.add("postfix")


RELAY_CLIENTS = "/etc/postfix/orgmail/relay_clients"
RELAY_MAP = "/etc/rspamd/orgmail/relays.map"
RELAY_SETTINGS = "/etc/rspamd/orgmail/relay_settings.inc"
RELAY_SIZE_MARGIN = 64 * 1024


def postfix_limits(role: str, limits: dict) -> dict:
    """A relay accepts only what the mailbox host takes after the relay's own headers, so it never
    has to bounce a message for its size (backscatter to a forged sender)."""
    limits = dict(limits)
    if role == "relay" and "message_size_limit" in limits:
        limits["message_size_limit"] = int(limits["message_size_limit"]) - RELAY_SIZE_MARGIN
    return limits


def relay_addresses(names: list, published: str | None) -> list | None:
    """The backup MX relays' Elastic IPs, from the relay-addresses parameter Pulumi writes once the
    addresses exist ({"mx2.example.org": "198.51.100.2", ...}). Never from DNS: a name in a zone is
    not proof of the relay's address. None while the parameter is missing or does not name every
    relay (a new relay's address is not published yet), so the last known maps stay in place."""
    if not names:
        return []
    if published is None:
        return None
    found = json.loads(published)
    if not isinstance(found, dict) or not all(name in found for name in names):
        return None
    return sorted({str(ipaddress.ip_address(found[name])) for name in names})


def apply_relay_clients(names: list, published: str | None) -> set:
    """The relays' addresses for Postfix (postscreen and rate-limit exceptions) and rspamd (external_relay:
    the original client's address is judged; settings.conf: no greylisting, rate limit or reject)."""
    found = relay_addresses(names, published)
    if found is None and all(Path(p).exists() for p in (RELAY_CLIENTS, RELAY_MAP, RELAY_SETTINGS)):
        return set()
    found = found or []
    changed = set()
    if write(RELAY_CLIENTS, lines(f"{a}/{128 if ':' in a else 32} permit" for a in found)):
        changed.add("postfix")
    if write(RELAY_MAP, lines(found)):
        changed.add("rspamd")
    if write(RELAY_SETTINGS, relay_settings(found)):
        changed.add("rspamd")
    return changed


def relay_settings(addresses: list) -> str:
    """rspamd settings for connections from the relays (local.d/settings.conf includes them): no
    greylisting, rate limit or refusal for content. No relays, no rule (one without a condition
    would match every message)."""
    if not addresses:
        return ""
    ips = ", ".join(f'"{a}/{128 if ":" in a else 32}"' for a in addresses)
    return lines([
        "orgmail_relays {",
        "  priority = high;",
        f"  ip = [{ips}];",
        '  apply { symbols_disabled = ["GREYLIST_CHECK", "GREYLIST_SAVE", "RATELIMIT_CHECK"]; '
        "actions { reject = null; greylist = null; } }",
        "}",
    ])


def user_rates(limits: dict) -> str:
    """rspamd ratelimit buckets per login, included by local.d/ratelimit.conf. A leaky bucket: N
    at once, then N an hour as it drains. Each bucket has its own key (id()), or they would share one."""
    rows = []
    for kind, setting in (("messages", "messagesPerUserHour"), ("recipients", "recipientsPerUserHour")):
        n = int(limits[setting])
        rows.append(f'user_{kind} {{ selector = "id(\'{kind}\');user.lower"; bucket {{ burst = {n}; rate = "{n} / 1h"; '
                    f'skip_recipients = {str(kind == "messages").lower()}; message = "Limit of {n} {kind} per user '
                    f'an hour reached (rateLimits.{setting})"; }} }}')
    return lines(rows)


SERVICES = ("postfix", "rspamd", "fail2ban", "postsrsd", "dovecot", "nftables")
# One empty file per service whose reload is owed (orgmail-cert-deploy adds them too): made before
# the reload, removed only after it succeeded, so a reload that fails after its files were written is
# retried at every run until it succeeds, across failed runs and reboots alike.
PENDING = Path("/var/lib/orgmail/reload-pending")


# Webmail (orgmail:webmail): Roundcube behind nginx on 127.0.0.1:8080, published by cloudflared.
# php-fpm first: named before roundcube-core, it satisfies PHP's web server dependency (else apt pulls Apache).
WEBMAIL_PACKAGES = ("php-fpm", "roundcube-core", "roundcube-sqlite3", "roundcube-plugins", "nginx", "sqlite3",
                    "python3-bcrypt")
WEBMAIL_DEBCONF = ("roundcube-core roundcube/dbconfig-install boolean false\n"  # its database is ours (below)
                   "roundcube-core roundcube/reconfigure-webserver multiselect\n"
                   "roundcube-core roundcube/restart-webserver boolean false\n")
WEBMAIL_DIR = Path("/srv/mail/webmail")  # Roundcube's database, on the mail volume
POLICY_RC = Path("/usr/sbin/policy-rc.d")
ROUNDCUBE_DB = WEBMAIL_DIR / "roundcube.db"
ROUNDCUBE_CONFIG = "/etc/roundcube/config.inc.php"
NGINX_SITE = Path("/etc/nginx/sites-enabled/orgmail-webmail")
PLUGIN_LINK = Path("/var/lib/roundcube/plugins/orgmail_password")
TUNNEL_TOKEN = "/etc/orgmail/tunnel-token"
CLOUDFLARED = Path("/usr/local/bin/cloudflared")
WEBMAIL_UNITS = ("nginx.service", "orgmail-passwd.socket", "orgmail-tunnel.service")


def php_fpm_unit() -> str:
    """php<version>-fpm.service: the version is Debian's PHP (8.4 in Debian 13)."""
    units = sorted(p.name for p in Path("/usr/lib/systemd/system").glob("php*-fpm.service"))
    if not units:
        raise RuntimeError("webmail: no php-fpm service installed")
    return units[-1]


def installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.stdout == "install ok installed"


def php_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def roundcube_config(web: dict, mail_host: str, des_key: str) -> str:
    """/etc/roundcube/config.inc.php: orgmail's settings, and what is this host's own."""
    tls = ("['ssl' => ['peer_name' => " + php_string(mail_host) + ", 'verify_peer' => true, "
           "'verify_peer_name' => true, 'cafile' => '/etc/orgmail/tls/fullchain.pem', 'capath' => '/etc/ssl/certs']]")
    return lines([
        "<?php",
        "// Written by orgmail-sync (orgmail:webmail); the settings are in /etc/orgmail/webmail/roundcube.inc.php.",
        "$config = [];",
        "include '/etc/orgmail/webmail/roundcube.inc.php';",
        f"$config['des_key'] = {php_string(des_key)};",
        f"$config['product_name'] = {php_string(web['productName'])};",
        f"$config['imap_conn_options'] = {tls};",
        f"$config['smtp_conn_options'] = {tls};",
        f"$config['managesieve_conn_options'] = {tls};",
        f"$config['password_force_new_user'] = {'true' if web.get('requirePasswordChange') else 'false'};",
    ])


def ensure_cloudflared(pin: dict) -> bool:
    """cloudflared (not in Debian) at the pinned version, its SHA-256 checked before it is installed."""
    import hashlib
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    want = pin["sha256"].get(arch)
    if want is None:
        raise RuntimeError(f"cloudflared: no pinned build for {arch}")
    if CLOUDFLARED.exists() and hashlib.sha256(CLOUDFLARED.read_bytes()).hexdigest() == want:
        return False
    url = pin["url"].format(version=pin["version"], arch=arch)
    part = CLOUDFLARED.with_name("cloudflared.download")
    proc = subprocess.run(["curl", "-fsSL", "--max-time", "300", "-o", str(part), url], capture_output=True, text=True)
    if proc.returncode != 0:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"cloudflared: download of {url} failed: {proc.stderr.strip()[-300:]}")
    got = hashlib.sha256(part.read_bytes()).hexdigest()
    if got != want:
        part.unlink()
        raise RuntimeError(f"cloudflared {pin['version']} ({arch}) from {url}: SHA-256 {got} is not the pinned {want}; "
                           "not installed")
    part.chmod(0o755)
    os.replace(part, CLOUDFLARED)
    return True


def apply_webmail(config: dict, params: dict, changed: set, boot: bool) -> None:
    """Install and configure webmail while orgmail:webmail is set; stop it when it is not."""
    web = config.get("webmail")
    if not web:
        units = ["orgmail-tunnel.service", "orgmail-passwd.socket"]
        if installed("nginx"):
            units += ["nginx.service", php_fpm_unit()]
        for unit in units:  # turned off: nothing of it runs (its database stays on the volume)
            enabled = subprocess.run(["systemctl", "is-enabled", "--quiet", unit]).returncode == 0
            active = subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0
            if enabled or active:
                subprocess.run(["systemctl", "disable", "--now", unit], capture_output=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not all(installed(p) for p in WEBMAIL_PACKAGES):
        subprocess.run(["debconf-set-selections"], input=WEBMAIL_DEBCONF, text=True, check=True)
        # Nothing starts as it installs (nginx would serve Debian's default site on port 80 until configured).
        guard = POLICY_RC
        made = not guard.exists()
        if made:
            guard.write_text("#!/bin/sh\nexit 101\n")
            guard.chmod(0o755)
        try:
            proc = subprocess.run(["apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                                   "-o", "DPkg::Lock::Timeout=600", *WEBMAIL_PACKAGES],
                                  capture_output=True, text=True, env=env, timeout=1800)
        finally:
            if made:
                guard.unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"webmail: apt-get install failed: {(proc.stdout + proc.stderr).strip()[-400:]}")
    Path("/etc/nginx/sites-enabled/default").unlink(missing_ok=True)  # Debian's: port 80 on every address
    if not NGINX_SITE.is_symlink():
        NGINX_SITE.symlink_to("/etc/orgmail/webmail/nginx-site.conf")
        changed.add("webmail")
    if not PLUGIN_LINK.is_symlink():
        PLUGIN_LINK.symlink_to("/etc/orgmail/webmail/orgmail_password")
    www = group_id("www-data")
    des_key = params.get("webmail/des-key", "").strip()
    if not des_key:
        raise RuntimeError("webmail: no webmail/des-key parameter")
    if write(ROUNDCUBE_CONFIG, roundcube_config(web, config["mailHost"], des_key), 0o640, (0, www)):
        changed.add("webmail")
    # Its database: made, and its schema kept at Roundcube's version (a Debian update may bring one).
    if os.path.ismount("/srv/mail"):
        WEBMAIL_DIR.mkdir(mode=0o750, exist_ok=True)
        os.chown(WEBMAIL_DIR, www, www)
        if not ROUNDCUBE_DB.exists():
            subprocess.run(["runuser", "-u", "www-data", "--", "sqlite3", str(ROUNDCUBE_DB)], check=True, text=True,
                           input=Path("/usr/share/roundcube/SQL/sqlite.initial.sql").read_text())
            ROUNDCUBE_DB.chmod(0o640)
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "roundcube-core"],
                                 capture_output=True, text=True).stdout
        stamp = WEBMAIL_DIR / "schema-of"
        if not stamp.exists() or stamp.read_text() != version:
            subprocess.run(["runuser", "-u", "www-data", "--", "/usr/share/roundcube/bin/updatedb.sh",
                            "--package=roundcube", "--dir=/usr/share/roundcube/SQL"], check=True, capture_output=True)
            write(str(stamp), version)
    tunnel = ensure_cloudflared(web["cloudflared"])
    token = params.get("webmail/tunnel-token", "").strip()
    if token and write(TUNNEL_TOKEN, token + "\n", 0o600):
        tunnel = True
    if boot:
        return  # the bootstrap's last step runs orgmail-sync again, which starts them
    units = [php_fpm_unit(), *(u for u in WEBMAIL_UNITS if u != "orgmail-tunnel.service" or (token and CLOUDFLARED.exists()))]
    subprocess.run(["systemctl", "enable", "--now", *units], check=True, capture_output=True)
    if "webmail" in changed:
        subprocess.run(["systemctl", "reload-or-restart", "nginx.service", php_fpm_unit()], check=True,
                       capture_output=True)
    if tunnel and "orgmail-tunnel.service" in units:
        subprocess.run(["systemctl", "restart", "orgmail-tunnel.service"], check=True, capture_output=True)


def reload(services: set) -> list:
    """Reload `services` and every service still pending; return the reloads that failed (kept pending).
    A service that is not running owes nothing (it reads its files when it starts); postsrsd, which
    cannot reload, restarts."""
    PENDING.mkdir(parents=True, exist_ok=True)
    for name in services:
        (PENDING / name).touch()
    failed = []
    restarting = (PENDING / "dovecot-restart").exists()
    for marker in sorted(PENDING.iterdir()):
        if marker.name == "dovecot" and restarting:
            continue  # the restart below reads everything; its marker goes when it succeeded
        if marker.name in SERVICES:
            proc = subprocess.run(["systemctl", "try-reload-or-restart", f"{marker.name}.service"],
                                  capture_output=True, text=True)
        elif marker.name == "dovecot-restart":
            proc = subprocess.run(["systemctl", "try-restart", "dovecot.service"], capture_output=True, text=True)
            if proc.returncode == 0:
                (PENDING / "dovecot").unlink(missing_ok=True)
        elif marker.name == "dovecot-auth":  # the users file changed: old passwords leave Dovecot's auth cache
            running = subprocess.run(["systemctl", "is-active", "--quiet", "dovecot.service"]).returncode == 0
            proc = subprocess.run(["doveadm", "auth", "cache", "flush"] if running else ["true"],
                                  capture_output=True, text=True)
        else:
            marker.unlink(missing_ok=True)
            continue
        if proc.returncode:
            failed.append(f"reload of {marker.name} failed, kept pending: {proc.stderr.strip()[-300:]}")
            continue
        marker.unlink(missing_ok=True)  # orgmail-cert-deploy's too
    return failed


def grow_volume() -> list:
    """The volume's file system grown to the volume's size (a tier change makes the volume bigger)."""
    return ["orgmail-volume grow failed"] if subprocess.run(["/usr/local/sbin/orgmail-volume", "grow"]).returncode else []


def main() -> int:
    # Waits for another run as long as it takes, as systemd does for the timer's oneshot runs.
    fcntl.flock(os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600), fcntl.LOCK_EX)
    return run()


def run() -> int:
    boot = "--boot" in sys.argv
    env = host_env()
    # On EC2 the instance role supplies credentials; host.env has AWS_* settings only in tests.
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    cluster = "--cluster" in sys.argv
    attempts = 6 if boot else 1  # at boot: orgmail-bootstrap.service retries, backing off
    error = ""
    for attempt in range(attempts):
        changed: set = set()
        problems = []
        try:
            # A cluster host reads only its role's config (a relay SES's credentials, an edge the DQS key).
            params = fetch(env, ("config", "ses", "spamhaus")) if cluster else fetch(env)
            for needed in ("config",) if cluster else ("config", f"files/{env['ROLE']}"):
                if needed not in params:
                    raise RuntimeError(f"no {needed!r} parameter under {env['SSM_PATH']}")
            if cluster:
                apply_cluster(env, params, changed)
            else:
                refuse_incomplete(env, params)
                apply(env, params, changed)
                apply_ssm_agent(env, json.loads(params["config"])["admin"]["ssmSessionManager"])
        except (RuntimeError, subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
            problems.append(str(e))
        if not boot:
            # Also after an error: what was written reloads, and what earlier runs owe is retried.
            try:
                problems += reload(changed) + ([] if env["ROLE"] == "edge" else grow_volume())  # edges: no volume
            except (subprocess.SubprocessError, OSError) as e:
                problems.append(str(e))
        if not problems:
            status = {"time": int(time.time()), "result": "ok", "changed": sorted(changed)}
            write(str(STATUS), json.dumps(status) + "\n")
            LAST_OK.touch()  # its time is the last good sync (orgmail-health's SyncAgeMinutes)
            verb = "changed (services start after)" if boot else "reloaded"
            print(f"orgmail-sync: ok; {verb}: {', '.join(sorted(changed)) or 'nothing'}")
            return 0
        error = "; ".join(problems)
        print(f"orgmail-sync: attempt {attempt + 1}/{attempts}: {error}", file=sys.stderr)
        if attempt + 1 < attempts:
            time.sleep(5)
    write(str(STATUS), json.dumps({"time": int(time.time()), "result": "error", "error": error}) + "\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
