"""The peer baseline for inbound throughput: Debian 13's packages wired as mailcow and docker-mailserver
wire them (Postfix -> rspamd milter -> Dovecot LMTP into Maildir), from this small config of our own.

Read for facts, not copied (fetched 2026-12-02):
- mailcow/mailcow-dockerized@0642467 data/conf/postfix/main.cf, master.cf,
  data/conf/rspamd/override.d/worker-proxy.inc, local.d/{actions,greylist,ratelimit,options}.conf|inc;
- docker-mailserver/docker-mailserver@c9b015d target/postfix/main.cf, master.cf,
  target/rspamd/local.d/{worker-proxy,worker-normal,options,actions,greylist}.inc|conf,
  target/dovecot/{10-mail,20-lmtp,90-sieve}.conf, target/scripts/startup/setup.d/{postfix,dovecot}.sh,
  setup.d/security/{rspamd,misc}.sh, target/scripts/startup/variables-stack.sh.

Mirrored from both: the milter (protocol 6, rspamd's proxy worker on 11332, Redis on 127.0.0.1:6379,
rspamd's module defaults), virtual mailbox domains delivered by Postfix's lmtp client to Dovecot,
Maildir, Dovecot's quota plugin, Sieve in LMTP with a global "after" script filing rspamd's spam
into Junk, smtpd_helo_required, disable_vrfy_command, no fail2ban. From docker-mailserver: the proxy
scans by itself (self_scan, count = 2, normal worker disabled; mailcow's proxy hands each message to a
normal worker instead, one more hop), milter_default_action = accept.

Differences, and why:
- No postscreen, as the issue defines the peer. Both peers in fact run postscreen on port 25
  (master.cf of each: ``smtp inet ... postscreen``); docker-mailserver with its DNSBLs off by default.
- No reject_unknown_sender_domain (both peers have it): the benchmark's resolver answers NXDOMAIN
  for every name, so it would reject the whole load; orgmail does not use it either.
- mynetworks is 127.0.0.1/32 as on orgmail, so the load generators (127.0.0.10-17) are remote
  clients to both Postfixes. rspamd treats every loopback client as local on both hosts alike, so
  neither greylists the measured load (rspamd's greylist module skips local clients by default);
  Debian's rspamd defines no rate limits. The load is checked to arrive whole.
- Only LMTP in Dovecot: IMAP and POP3 have no part in the measured path.

Two peers are measured: the wiring both share (mailcow's: quota checked only at delivery), and the
same with docker-mailserver's default quota check at RCPT (Dovecot's quota-status policy service),
which orgmail also makes (a full mailbox refused at RCPT, never bounced).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

HOSTNAME = "mail.example.org"
DOMAIN = "example.org"
VMAIL_UID = 5000
VMAIL_HOME = "/var/vmail"
LMTP_SOCKET = "private/dovecot-lmtp"  # in Postfix's queue directory, as orgmail's; Debian's lmtp client runs chrooted there
MILTER = "inet:127.0.0.1:11332"
SIEVE_AFTER = "/etc/dovecot/sieve/spam-to-junk.sieve"

# postconf -e over Debian's "Internet Site" main.cf.
POSTFIX_MAIN: dict[str, str] = {
    "myhostname": HOSTNAME,
    "mydestination": "$myhostname, localhost",
    "mynetworks": "127.0.0.1/32 [::1]/128",
    "virtual_mailbox_domains": DOMAIN,
    "virtual_mailbox_maps": "texthash:/etc/postfix/vmailbox",
    "virtual_transport": f"lmtp:unix:{LMTP_SOCKET}",
    "smtpd_helo_required": "yes",
    "disable_vrfy_command": "yes",
    "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
    "smtpd_milters": MILTER,
    "non_smtpd_milters": "$smtpd_milters",
    "milter_protocol": "6",
    "milter_mail_macros": "i {mail_addr} {client_addr} {client_name} {auth_authen}",
    "milter_default_action": "accept",
}

RSPAMD_LOCAL: dict[str, str] = {
    "worker-proxy.inc": """milter = yes;
bind_socket = "127.0.0.1:11332";
timeout = 120s;
upstream "local" {
  default = yes;
  self_scan = yes;
}
count = 2;
""",
    "worker-normal.inc": "enabled = false;\n",
    "redis.conf": 'servers = "127.0.0.1:6379";\n',
}

# docker-mailserver's spam_to_junk.sieve files by special-use (\Junk), which needs Pigeonhole's
# special-use extension enabled; the Junk mailbox has that name here, so plain fileinto does the same.
SPAM_TO_JUNK = """require "fileinto";
if anyof (header :contains "X-Spam-Flag" "YES", header :contains "X-Spam" "Yes") {
  fileinto "Junk";
}
"""

DOVECOT_CONF = f"""dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
protocols = lmtp
ssl = no

mail_driver = maildir
mail_path = ~/Maildir
mail_uid = vmail
mail_gid = vmail
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
}}

# Dovecot's auth process needs a passdb; the load never logs in, and no password ever matches.
passdb passwd-file {{
  passwd_file_path = /etc/dovecot/users
}}
userdb passwd-file {{
  passwd_file_path = /etc/dovecot/users
}}

service lmtp {{
  unix_listener /var/spool/postfix/{LMTP_SOCKET} {{
    mode = 0600
    user = postfix
    group = postfix
  }}
}}

mail_plugins {{
  quota = yes
}}
quota "User quota" {{
}}
protocol lmtp {{
  mail_plugins {{
    sieve = yes
  }}
}}
sieve_script spam_to_junk {{
  type = after
  path = {SIEVE_AFTER}
}}
"""


def home(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{VMAIL_HOME}/{domain}/{local}"


def vmailbox(recipients: Sequence[str]) -> str:
    return "".join(f"{r} {r.split('@')[1]}/{r.split('@')[0]}/\n" for r in recipients)


def dovecot_users(recipients: Sequence[str]) -> str:
    return "".join(f"{r}:{{CRYPT}}!:{VMAIL_UID}:{VMAIL_UID}::{home(r)}::\n" for r in recipients)


# docker-mailserver's default (ENABLE_QUOTAS=1) asks Dovecot's quota-status at RCPT, as orgmail does:
# target/dovecot/90-quota.conf has this service, setup.d/dovecot.sh appends the policy check to
# smtpd_recipient_restrictions. mailcow checks quota only at delivery (its main.cf has no policy check).
QUOTA_POLICY = "inet:127.0.0.1:65265"
QUOTA_STATUS_CONF = """
service quota-status {
  executable = quota-status -p postfix
  inet_listener quota-status {
    listen = 127.0.0.1
    port = 65265
  }
  client_limit = 1
}
"""


def postfix_main(quota_at_rcpt: bool = False) -> dict[str, str]:
    """The peer's main.cf settings; `quota_at_rcpt`: docker-mailserver's default quota check too."""
    main = dict(POSTFIX_MAIN)
    if quota_at_rcpt:
        main["smtpd_recipient_restrictions"] += f", check_policy_service {QUOTA_POLICY}"
    return main


def files(recipients: Sequence[str], quota_at_rcpt: bool = False) -> dict[str, str]:
    """Every file the peer guest gets, by path."""
    out = {
        "/etc/postfix/vmailbox": vmailbox(recipients),
        "/etc/dovecot/dovecot.conf": DOVECOT_CONF + (QUOTA_STATUS_CONF if quota_at_rcpt else ""),
        "/etc/dovecot/users": dovecot_users(recipients),
        SIEVE_AFTER: SPAM_TO_JUNK,
    }
    out.update({f"/etc/rspamd/local.d/{name}": text for name, text in RSPAMD_LOCAL.items()})
    return out


def user_data(recipients: Sequence[str], quota_at_rcpt: bool = False, data_disk: str | None = None) -> str:
    """The peer guest's cloud-config: the files above, then Postfix configured and the four services
    started. Only Postfix, Dovecot, rspamd and Redis run; the root's other services are stopped.
    `data_disk`: a blank disk formatted and mounted as orgmail's mail volume is (ext4, `-m 0`), holding the mail
    (VMAIL_HOME), so both keep mail on the same kind of disk."""
    disk: list[list[str]] = [] if data_disk is None else [
        ["mkfs.ext4", "-q", "-m", "0", data_disk], ["mkdir", "-p", VMAIL_HOME], ["mount", data_disk, VMAIL_HOME]]
    runcmd: list[list[str]] = [
        *disk,
        ["systemctl", "disable", "--now", "--no-block", "fail2ban", "unbound", "postsrsd"],
        ["sh", "-c", "printf '%s\\n' 'postfix postfix/main_mailer_type select Internet Site' "
         f"'postfix postfix/mailname string {HOSTNAME}' "
         f"'postfix postfix/destinations string {HOSTNAME}, localhost' | debconf-set-selections"],
        ["sh", "-c", "DEBIAN_FRONTEND=noninteractive dpkg-reconfigure postfix"],
        ["postconf", "-e", *(f"{k} = {v}" for k, v in postfix_main(quota_at_rcpt).items())],
        ["useradd", "--system", "--uid", str(VMAIL_UID), "--user-group", "--home-dir", VMAIL_HOME,
         "--create-home", "--shell", "/usr/sbin/nologin", "vmail"],
        ["chown", "vmail:vmail", VMAIL_HOME],
        ["sievec", SIEVE_AFTER],
        ["systemctl", "restart", "redis-server", "rspamd", "dovecot", "postfix"],
    ]
    return "#cloud-config\n" + json.dumps({
        "write_files": [{"path": p, "content": c, "permissions": "0644"} for p, c in files(recipients, quota_at_rcpt).items()],
        "runcmd": runcmd,
    }) + "\n"
