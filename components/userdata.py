"""Render a host's cloud-init user-data from the templates in cloud-init/, from plain values only.

The user-data carries no secret and no mailbox list: the host reads those from SSM at boot and on
every sync, so a day-2 change (mailbox, alias, password, rate limit) never changes user-data and
never touches the instance.
"""

from __future__ import annotations

import ast
import base64
import functools
import gzip
import hashlib
import io
import json
import re
import tokenize
from dataclasses import dataclass, field, replace
from pathlib import Path

import jinja2

from components.directory import DIRECTORY_CA_FILE, rds_ca_bundle_url
from components.parameters import parts_of

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "cloud-init"
EC2_USER_DATA_LIMIT = 16 * 1024  # bytes of raw user-data, before base64

MAIL_PORTS: tuple[int, ...] = (25, 465, 587, 993, 995)
RELAY_PORTS: tuple[int, ...] = (25,)

# logrotate: the rules Debian's packages drop in /etc/logrotate.d (fail2ban's log, Dovecot's failed
# logins) do nothing without it, and a minimal image may lack it.
COMMON_PACKAGES = (
    "postfix", "rspamd", "redis-server", "certbot", "fail2ban",
    "python3-systemd", "nftables", "unattended-upgrades", "awscli", "curl", "openssl",
    "restic", "unbound", "logrotate",
)
# libsasl2-modules: the PLAIN and LOGIN mechanisms Postfix's SMTP client logs in to SES with (outbound.relay).
MAILBOX_PACKAGES = ("dovecot-imapd", "dovecot-pop3d", "dovecot-lmtpd", "dovecot-sieve", "dovecot-managesieved", "dovecot-auth-lua", "postsrsd",
                    "libsasl2-modules")
# How long a boot without a valid certificate waits for certbot before the mail services start (on
# the self-signed fallback if it failed). An issuance takes about a minute.
CERT_BOOT_WAIT_SECONDS = 180


@dataclass(frozen=True)
class HostFile:
    template: str  # path under cloud-init/files
    path: str  # where it lands on the host
    mode: str = "0644"
    roles: tuple[str, ...] = ("mailbox", "relay")
    # Three ways to the host (EC2 allows 16 KB of user-data):
    # - user_data: the bootstrap and orgmail-unbundle, which writes the bundle (orgmail-sync among it,
    #   which fetches everything else from SSM), and the firewall, which the bootstrap starts first.
    # - via_ssm: the same on every host of a role (a template sees only the role): orgmail-sync
    #   writes them at every run, so a change is a day-2 update (a reload), no new host.
    # - neither: the host's bundle (bundle/<host name> in SSM), written once by the first boot after
    #   its SHA-256 matched the one in user-data; so a change still makes a new instance.
    via_ssm: bool = False
    user_data: bool = False

    def __post_init__(self) -> None:
        if self.via_ssm and self.user_data:
            raise ValueError(f"{self.template}: a host file travels one way, user-data or SSM")


# Every file the host gets, in one table.
HOST_FILES: tuple[HostFile, ...] = (
    HostFile("orgmail/host.env.j2", "/etc/orgmail/host.env", user_data=True),
    HostFile("orgmail/bootstrap.sh.j2", "/usr/local/sbin/orgmail-bootstrap", "0755", user_data=True),
    HostFile("systemd/orgmail-bootstrap.service", "/etc/systemd/system/orgmail-bootstrap.service", user_data=True),
    HostFile("orgmail/unbundle.py", "/usr/local/sbin/orgmail-unbundle", "0755", user_data=True),
    HostFile("orgmail/sync.py", "/usr/local/sbin/orgmail-sync", "0755"),
    HostFile("orgmail/cert-deploy.sh.j2", "/usr/local/sbin/orgmail-cert-deploy", "0755"),
    HostFile("orgmail/queue.sh", "/usr/local/sbin/orgmail-queue", "0755"),
    HostFile("orgmail/volume.py", "/usr/local/sbin/orgmail-volume", "0755", via_ssm=True),
    HostFile("systemd/orgmail-volume.service", "/etc/systemd/system/orgmail-volume.service", via_ssm=True),
    HostFile("orgmail/acme-hook.py", "/usr/local/sbin/orgmail-acme-hook", "0755", via_ssm=True),
    HostFile("postfix/main.cf.j2", "/etc/postfix/main.cf"),
    HostFile("postfix/master.cf.j2", "/etc/postfix/master.cf"),
    HostFile("postfix/submission_header_checks", "/etc/postfix/submission_header_checks", roles=("mailbox",),
             via_ssm=True),
    HostFile("postfix/srs-only.regexp", "/etc/postfix/srs-only.regexp", roles=("mailbox",), via_ssm=True),
    HostFile("dovecot/dovecot.conf.j2", "/etc/dovecot/dovecot.conf", roles=("mailbox",)),
    HostFile("dovecot/orgmail-dovecot.tmpfiles", "/etc/tmpfiles.d/orgmail-dovecot.conf", roles=("mailbox",)),
    HostFile("dovecot/orgmail-dovecot.logrotate", "/etc/logrotate.d/orgmail-dovecot", roles=("mailbox",)),
    HostFile("dovecot/orgmail-passdb.lua", "/etc/dovecot/orgmail-passdb.lua", roles=("mailbox",), via_ssm=True),
    HostFile("rspamd/worker-proxy.inc.j2", "/etc/rspamd/local.d/worker-proxy.inc", via_ssm=True),
    HostFile("rspamd/worker-controller.inc", "/etc/rspamd/local.d/worker-controller.inc", roles=("mailbox",),
             via_ssm=True),
    HostFile("dovecot/spam-to-junk.sieve", "/etc/dovecot/sieve/spam-to-junk.sieve", roles=("mailbox",), via_ssm=True),
    HostFile("dovecot/learn-spam.sieve", "/etc/dovecot/sieve/learn-spam.sieve", roles=("mailbox",), via_ssm=True),
    HostFile("dovecot/learn-ham.sieve", "/etc/dovecot/sieve/learn-ham.sieve", roles=("mailbox",), via_ssm=True),
    HostFile("dovecot/rspamd-learn", "/usr/local/lib/orgmail/sieve-pipe/rspamd-learn", "0755", roles=("mailbox",),
             via_ssm=True),
    HostFile("dovecot/quota-warning", "/usr/local/lib/orgmail/quota-warning", "0755", roles=("mailbox",), via_ssm=True),
    HostFile("dovecot/convert-maildir.py", "/usr/local/sbin/orgmail-convert-maildir", "0755", roles=("mailbox",),
             via_ssm=True),
    HostFile("systemd/orgmail-mail-format.service", "/etc/systemd/system/orgmail-mail-format.service",
             roles=("mailbox",), via_ssm=True),
    HostFile("rspamd/worker-normal.inc.j2", "/etc/rspamd/local.d/worker-normal.inc", via_ssm=True),
    HostFile("systemd/rspamd-workers.conf.j2", "/etc/systemd/system/rspamd.service.d/orgmail.conf"),
    HostFile("rspamd/redis.conf.j2", "/etc/rspamd/local.d/redis.conf", via_ssm=True),
    HostFile("rspamd/actions.conf.j2", "/etc/rspamd/local.d/actions.conf", via_ssm=True),
    HostFile("rspamd/options.inc.j2", "/etc/rspamd/local.d/options.inc", via_ssm=True),
    HostFile("unbound/orgmail.conf.j2", "/etc/unbound/unbound.conf.d/orgmail.conf"),
    HostFile("rspamd/milter_headers.conf.j2", "/etc/rspamd/local.d/milter_headers.conf", via_ssm=True),
    HostFile("rspamd/dkim_signing.conf.j2", "/etc/rspamd/local.d/dkim_signing.conf", via_ssm=True),
    HostFile("rspamd/arc.conf", "/etc/rspamd/local.d/arc.conf", roles=("mailbox",), via_ssm=True),
    HostFile("postsrsd/postsrsd.default", "/etc/default/postsrsd", roles=("mailbox",), via_ssm=True),
    HostFile("rspamd/orgmail_from.lua", "/etc/rspamd/lua.local.d/orgmail_from.lua", roles=("mailbox",), via_ssm=True),
    HostFile("rspamd/ratelimit.conf", "/etc/rspamd/local.d/ratelimit.conf", roles=("mailbox",), via_ssm=True),
    HostFile("rspamd/external_relay.conf", "/etc/rspamd/local.d/external_relay.conf", roles=("mailbox",), via_ssm=True),
    HostFile("rspamd/settings.conf", "/etc/rspamd/local.d/settings.conf", roles=("mailbox",), via_ssm=True),
    HostFile("fail2ban/jail.local.j2", "/etc/fail2ban/jail.local", via_ssm=True),
    HostFile("fail2ban/orgmail-dovecot.conf", "/etc/fail2ban/filter.d/orgmail-dovecot.conf", roles=("mailbox",),
             via_ssm=True),
    HostFile("fail2ban/postfix.local", "/etc/fail2ban/filter.d/postfix.local", via_ssm=True),
    HostFile("nftables.conf.j2", "/etc/nftables.conf", "0755", user_data=True),
    HostFile("systemd/orgmail-sync.service.j2", "/etc/systemd/system/orgmail-sync.service"),
    HostFile("systemd/orgmail-sync.timer.j2", "/etc/systemd/system/orgmail-sync.timer"),
    HostFile("systemd/orgmail-cert.service.j2", "/etc/systemd/system/orgmail-cert.service"),
    HostFile("systemd/orgmail-cert.timer.j2", "/etc/systemd/system/orgmail-cert.timer"),
    HostFile("backup/orgmail-backup.py", "/usr/local/sbin/orgmail-backup", "0755", roles=("mailbox",), via_ssm=True),
    HostFile("backup/orgmail-restore.sh", "/usr/local/sbin/orgmail-restore", "0755", roles=("mailbox",), via_ssm=True),
    HostFile("orgmail/import.py", "/usr/local/sbin/orgmail-import", "0755", roles=("mailbox",), via_ssm=True),
    HostFile("backup/orgmail-backup.service.j2", "/etc/systemd/system/orgmail-backup.service", roles=("mailbox",),
             via_ssm=True),
    HostFile("backup/orgmail-backup.timer.j2", "/etc/systemd/system/orgmail-backup.timer", roles=("mailbox",),
             via_ssm=True),
    HostFile("systemd/orgmail-queue.service", "/etc/systemd/system/orgmail-queue.service"),
    HostFile("orgmail/report.py", "/usr/local/sbin/orgmail-report", "0755", roles=("mailbox",), via_ssm=True),
    HostFile("orgmail/health.py", "/usr/local/sbin/orgmail-health", "0755", roles=("mailbox",), via_ssm=True),
    HostFile("systemd/orgmail-health.service", "/etc/systemd/system/orgmail-health.service", roles=("mailbox",),
             via_ssm=True),
    HostFile("systemd/orgmail-health.timer", "/etc/systemd/system/orgmail-health.timer", roles=("mailbox",),
             via_ssm=True),
    HostFile("systemd/orgmail-report.service", "/etc/systemd/system/orgmail-report.service", roles=("mailbox",),
             via_ssm=True),
    HostFile("systemd/orgmail-report.timer", "/etc/systemd/system/orgmail-report.timer", roles=("mailbox",),
             via_ssm=True),
    HostFile("orgmail/passwd.py", "/usr/local/sbin/orgmail-passwd", "0755", roles=("mailbox",), via_ssm=True),
    HostFile("systemd/orgmail-passwd.socket", "/etc/systemd/system/orgmail-passwd.socket", roles=("mailbox",),
             via_ssm=True),
    HostFile("systemd/orgmail-passwd@.service", "/etc/systemd/system/orgmail-passwd@.service", roles=("mailbox",),
             via_ssm=True),
    HostFile("systemd/orgmail-tunnel.service", "/etc/systemd/system/orgmail-tunnel.service", roles=("mailbox",),
             via_ssm=True),
    HostFile("webmail/nginx-site.conf", "/etc/orgmail/webmail/nginx-site.conf", roles=("mailbox",), via_ssm=True),
    HostFile("webmail/roundcube.inc.php", "/etc/orgmail/webmail/roundcube.inc.php", roles=("mailbox",), via_ssm=True),
    HostFile("webmail/orgmail_password/orgmail_password.php",
             "/etc/orgmail/webmail/orgmail_password/orgmail_password.php", roles=("mailbox",), via_ssm=True),
    HostFile("systemd/data-volume.conf.j2", "/etc/systemd/system/dovecot.service.d/orgmail.conf",
             roles=("mailbox",)),
    HostFile("systemd/dovecot-restart.conf", "/etc/systemd/system/dovecot.service.d/orgmail-restart.conf",
             roles=("mailbox",)),
    HostFile("systemd/data-volume.conf.j2", "/etc/systemd/system/postfix.service.d/orgmail.conf"),
)


@dataclass(frozen=True)
class HostConfig:
    """Plain values a host's user-data is rendered from: what only a new instance can apply."""

    stack: str
    role: str  # "mailbox" (holds the mailboxes) or "relay" (backup MX)
    hostname: str
    mail_host: str  # the mailbox host; a relay forwards to it
    region: str
    ssm_path: str
    data_volume_id: str | None  # the host's protected EBS volume: mailboxes (mailbox role) and Postfix's queue
    # No day-2 setting here (admin.*, upgrades.*): orgmail-sync applies those from the config
    # parameter, because anything in user-data replaces the instance when it changes.
    backup_bucket: str | None = None  # mailbox role: the S3 bucket holding the restic repository
    # Test overrides (tests/e2e/overrides.py is the one place that sets them):
    install_packages: bool = True  # False: packages are pre-installed, the boot needs no network
    cert_timer: bool = True  # False: certbot's renewal timer is not started (the boot's one attempt still runs)
    dnssec_validation: bool = True  # False: unbound does not validate (the test world's root is unsigned)
    aws_environment: tuple[tuple[str, str], ...] = ()  # AWS_* variables: a local SSM server, its credentials
    extra_packages: tuple[str, ...] = field(default=())
    volume_wait_seconds: int | None = None  # None: orgmail-volume's own wait (180 s) for a late volume

    def __post_init__(self) -> None:
        if self.role not in ("mailbox", "relay"):
            raise ValueError(f"unknown host role {self.role!r}")
        if not self.data_volume_id:
            raise ValueError("a host needs its volume id (mailboxes, Postfix's queue)")
        if any(not k.startswith("AWS_") for k, _ in self.aws_environment):
            raise ValueError("aws_environment takes AWS_* variables only")


@dataclass(frozen=True)
class RenderedFile:
    path: str
    mode: str
    content: str
    bundle: bool = False  # a cluster host's file that travels in its role's bundle (SSM), not in user-data


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def relay_parameters(hostname: str) -> tuple[str, ...]:
    """The parameters under the stack's SSM path a backup-MX relay reads (its role may read no others):
    the non-secret host configuration, the relay's host files, its own bundle and ACME challenge key, the
    stack's Spamhaus DQS key (its postscreen and rspamd query the lists too)."""
    return ("config", "files/relay", f"bundle/{hostname}", f"certbot/{hostname}", "spamhaus")


def _role_context(role: str) -> dict[str, object]:
    return {"role": role, "mail_ports": MAIL_PORTS if role == "mailbox" else RELAY_PORTS}


def _context(host: HostConfig) -> dict[str, object]:
    return {
        **host.__dict__,
        **_role_context(host.role),
        "cert_boot_wait": CERT_BOOT_WAIT_SECONDS,
        "ssm_read": " ".join(relay_parameters(host.hostname)) if host.role == "relay" else "",
        "packages": packages(host),
        "ssm_agent_url": SSM_AGENT_URL.format(region=host.region, arch="$(dpkg --print-architecture)"),
    }


def _render(env: jinja2.Environment, spec: HostFile, context: dict[str, object]) -> RenderedFile:
    name = f"files/{spec.template}"
    if spec.template.endswith(".j2"):
        content = env.get_template(name).render(context)
    else:
        content = (TEMPLATE_DIR / name).read_text()
    return RenderedFile(path=spec.path, mode=spec.mode, content=_shipped(spec, content))


def _in_bundle(spec: HostFile, role: str) -> bool:
    return role in spec.roles and not spec.via_ssm and not spec.user_data


def render_bundle(host: HostConfig) -> str:
    """The host's bundle as stored in SSM (bundle/<host name>): bundle_json of its bundle files."""
    env, context = _env(), _context(host)  # no bundle_sha256: a bundle file naming it fails (StrictUndefined)
    return bundle_json([_render(env, spec, context) for spec in HOST_FILES if _in_bundle(spec, host.role)])


# A bundle as stored: its JSON gzipped (deterministic) and base64-encoded, behind this prefix. About a quarter of
# the JSON's size: fewer 4 KB parameters for `pulumi up` to create (an ISP cluster's three bundles went from
# 60 parts to about 20), and the same text gives the same bytes and SHA-256.
BUNDLE_PREFIX = "gzip+base64:"


def bundle_json(files: list[RenderedFile]) -> str:
    """Files as a bundle, as stored: JSON {path: {mode, content}}, compact and sorted, then gzipped without a
    timestamp and base64-encoded (BUNDLE_PREFIX), so the same files give the same bytes and the same SHA-256
    (which the host's user-data names)."""
    return pack_bundle(json.dumps({f.path: {"mode": f.mode, "content": f.content} for f in files},
                                  separators=(",", ":"), sort_keys=True))


def pack_bundle(text: str) -> str:
    """A bundle's JSON text in its stored form (BUNDLE_PREFIX, base64 of the deterministic gzip)."""
    return BUNDLE_PREFIX + base64.b64encode(compress_user_data(text)).decode()


def bundle_files(stored: str) -> dict[str, dict[str, str]]:
    """A stored bundle's files, {path: {mode, content}} (orgmail-unbundle reads it the same way)."""
    if not stored.startswith(BUNDLE_PREFIX):
        raise ValueError(f"a bundle starts with {BUNDLE_PREFIX!r}")
    files: dict[str, dict[str, str]] = json.loads(gzip.decompress(base64.b64decode(stored[len(BUNDLE_PREFIX):])))
    return files


def bundle_sha256(bundle: str) -> str:
    return hashlib.sha256(bundle.encode()).hexdigest()


def bundle_parameter(host: HostConfig) -> str:
    """The bundle's parameter, under the stack's path (its parts below it)."""
    return f"{host.ssm_path}/bundle/{host.hostname}"


def render_files(host: HostConfig) -> list[RenderedFile]:
    """Every file of the host, whichever way it travels."""
    env = _env()
    context = {**_context(host), "bundle_sha256": bundle_sha256(render_bundle(host))}
    return [_render(env, spec, context) for spec in HOST_FILES if host.role in spec.roles]


def _shipped(spec: HostFile, content: str) -> str:
    """A host script as it travels: without the comments (they stay in the repository)."""
    if spec.template.endswith(".py"):
        return without_comments(content)
    if content.startswith(("#!/bin/sh\n", "#!/bin/bash\n")):
        return without_shell_comments(content, spec.template)
    return content


@functools.cache
def without_comments(source: str) -> str:
    """A Python host script without its comments and docstrings, code lines unchanged: the
    explanations stay in the repository, EC2's 16 KB of user-data carries the code (about 1.3 KB
    less, compressed). Cached: a plan ships the same few scripts in many bundles (the ISP cluster's
    plan spent half its time here, tokenizing orgmail-sync once per render)."""
    drop: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and len(node.body) > 1:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                drop.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines = source.splitlines(keepends=True)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = token.start
        if token.type == tokenize.COMMENT and row > 1:  # line 1: the #! line
            if lines[row - 1][:col].strip():
                lines[row - 1] = lines[row - 1][:col].rstrip() + "\n"
            else:
                drop.add(row)
    return "".join(line for number, line in enumerate(lines, 1) if number not in drop)


def without_shell_comments(script: str, name: str) -> str:
    """A shell script without its whole-line comments (the #! line kept), for the same reason as
    without_comments. A here-document could hold a line starting with #: refused."""
    lines = script.splitlines(keepends=True)
    if any(re.search(r"<<-?\s*['\"]?\w", line) for line in lines):
        raise ValueError(f"{name}: no here-documents in host shell scripts (their # lines are not comments)")
    return lines[0] + "".join(line for line in lines[1:] if not line.lstrip().startswith("#"))


def ssm_files(role: str) -> dict[str, dict[str, str]]:
    """The host files of `role` that orgmail-sync writes from SSM: {path: {mode, content}}."""
    files: dict[str, dict[str, str]] = {}
    for spec in HOST_FILES:
        if spec.via_ssm and role in spec.roles:
            if spec.template.endswith(".j2"):
                # Only the role: a template naming anything of one host fails here (StrictUndefined).
                try:
                    content = _env().get_template(f"files/{spec.template}").render(_role_context(role))
                except jinja2.UndefinedError as e:
                    raise ValueError(f"{spec.template}: files through SSM are the same for every host of a "
                                     f"role; it uses {e.message}") from e
            else:
                content = (TEMPLATE_DIR / "files" / spec.template).read_text()
            content = _shipped(spec, content)
            files[spec.path] = {"mode": spec.mode, "content": content}
    return files


def packages(host: HostConfig) -> tuple[str, ...]:
    extra = MAILBOX_PACKAGES if host.role == "mailbox" else ()
    return COMMON_PACKAGES + extra + host.extra_packages


def render_user_data(host: HostConfig) -> str:
    """The cloud-config document, as text: the bootstrap and what it needs before the bundle."""
    boot = {spec.path for spec in HOST_FILES if spec.user_data}
    files = [f for f in render_files(host) if f.path in boot]
    return _env().get_template("user-data.yaml.j2").render({**_context(host), "files": files})


def compress_user_data(text: str) -> bytes:
    """gzip, deterministic (no timestamp), so an unchanged render gives unchanged bytes."""
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def user_data_base64(text: str) -> str:
    data = compress_user_data(text)
    if len(data) > EC2_USER_DATA_LIMIT:
        raise ValueError(f"compressed user-data is {len(data)} bytes; EC2 allows {EC2_USER_DATA_LIMIT}")
    return base64.b64encode(data).decode()


# --- the ISP cluster's roles (components/edge.py, shard.py, outbound_relay.py) -----------------------------
# Each role renders its own files from a small typed args object; what they share with the single host
# (TLS, smtpd hardening, postscreen, rspamd, unbound, nftables, fail2ban, the volume scripts) comes from
# the same templates. A cluster host's user-data carries its bootstrap, its firewall and the files that name
# the host itself; the files that are the same on every host of its role travel in the role's bundle in SSM
# (<role path>/bundle/part-NNN), which the bootstrap writes first, only if the joined parts have the SHA-256
# that the user-data names (orgmail-unbundle): a changed bundle makes new instances, as a changed file did.

# AWS's SSM agent package (Debian's image has none), as the single host's orgmail-sync fetches it.
SSM_AGENT_URL = "https://s3.{region}.amazonaws.com/amazon-ssm-{region}/latest/debian_{arch}/amazon-ssm-agent.deb"

# A cluster host's first files, always in its user-data, whatever its role.
CLUSTER_BOOT_FILES: tuple[tuple[str, str, str], ...] = (
    ("cluster/cluster.env.j2", "/etc/orgmail/host.env", "0644"),
    ("cluster/bootstrap.sh.j2", "/usr/local/sbin/orgmail-bootstrap", "0755"),
    ("systemd/orgmail-bootstrap.service", "/etc/systemd/system/orgmail-bootstrap.service", "0644"),
    ("orgmail/unbundle.py", "/usr/local/sbin/orgmail-unbundle", "0755"),
    # The bootstrap starts the firewall before it asks the network anything.
    ("nftables.conf.j2", "/etc/nftables.conf", "0755"),
)

# In every cluster role's bundle: orgmail-sync --cluster, at boot and every 5 minutes, applies the role's day-2
# settings from its config (admin.sshCidrs; on a relay orgmail:outbound and SES's credentials).
CLUSTER_SYNC_FILES: tuple[tuple[str, str, str], ...] = (
    ("orgmail/sync.py", "/usr/local/sbin/orgmail-sync", "0755"),
    ("systemd/orgmail-sync.service.j2", "/etc/systemd/system/orgmail-sync.service", "0644"),
    ("systemd/orgmail-sync.timer.j2", "/etc/systemd/system/orgmail-sync.timer", "0644"),
)


def role_bundle(files: list[RenderedFile]) -> str:
    """A cluster role's bundle as stored in SSM: its bundle files in a single host's bundle format."""
    return bundle_json([f for f in files if f.bundle])


def role_bundle_parameters(role_path: str, bundle: str) -> dict[str, str]:
    """The bundle's parameters, <role path>/bundle/part-000, ...: what Pulumi stores (components/cluster.py,
    through stored_in_parts) and what a test puts in its SSM stand-in."""
    return parts_of(f"{role_path}/bundle", bundle)


@dataclass(frozen=True)
class ClusterHost:
    """What every cluster host's user-data names: no user, no secret."""

    stack: str
    role: str  # "edge", "shard" or "relay"
    region: str
    ssm_path: str  # the role's own sub-path, <stack path>/<role>
    hostname: str  # "" for an edge: EC2 names it, every edge serves the MX name
    packages: tuple[str, ...]
    services: tuple[str, ...]  # started, in this order, at the end of the first boot
    tls_units: tuple[str, ...]  # services that wait for /etc/orgmail/tls/fullchain.pem
    ssm_agent: bool = False  # admin.ssmSessionManager: AWS's SSM agent installed at the first boot
    # Test overrides (tests/e2e/test_cluster.py), as HostConfig's:
    install_packages: bool = True
    aws_environment: tuple[tuple[str, str], ...] = ()  # AWS_* variables: a local SSM server, its credentials
    directory_ca_url: str = ""  # "": RDS's bundle of the region (rds_ca_bundle_url); a test's CA otherwise

    def __post_init__(self) -> None:
        if self.role not in ("edge", "shard", "relay"):
            raise ValueError(f"unknown cluster role {self.role!r}")
        if any(not k.startswith("AWS_") for k, _ in self.aws_environment):
            raise ValueError("aws_environment takes AWS_* variables only")
        if not self.ssm_path.endswith(f"/{self.role}"):
            raise ValueError(f"a cluster {self.role} reads only its own SSM path, not {self.ssm_path!r}")


def render_template(template: str, context: dict[str, object]) -> str:
    """One file of cloud-init/ from plain values (Jinja2, undefined names are errors)."""
    return _env().get_template(template).render(context)


def cluster_files(host: ClusterHost, context: dict[str, object], files: list[tuple[str, str, str]],
                  host_files: list[tuple[str, str, str]] | None = None,
                  extra: list[RenderedFile] | None = None) -> list[RenderedFile]:
    """A cluster host's files, each spec (template under cloud-init/files, path on the host, mode) rendered with
    the host's values and `context`: its boot files and `host_files` (which name the host) for its user-data,
    then `files` and `extra`, the same on every host of the role, for the role's bundle, whose SHA-256 the
    host's env file names."""
    full = {**host.__dict__, **context, "cluster_role": host.role, "directory_ca_file": DIRECTORY_CA_FILE,
            "directory_ca_url": host.directory_ca_url or rds_ca_bundle_url(host.region),
            "ssm_agent_url": SSM_AGENT_URL.format(region=host.region, arch="$(dpkg --print-architecture)")}

    def rendered(specs: list[tuple[str, str, str]], values: dict[str, object], bundle: bool) -> list[RenderedFile]:
        out = []
        for template, path, mode in specs:
            file = _render(_env(), HostFile(template, path, mode), values)
            out.append(RenderedFile(file.path, file.mode, without_config_comments(file.path, file.content), bundle))
        return out

    bundle = rendered([*files, *CLUSTER_SYNC_FILES], full, True) + [replace(f, bundle=True) for f in extra or []]
    boot_values = {**full, "bundle_sha256": bundle_sha256(role_bundle(bundle))}
    return rendered([*CLUSTER_BOOT_FILES, *(host_files or [])], boot_values, False) + bundle


# Configuration formats where a line whose first non-blank character is # is a comment, and only that.
CONFIG_COMMENT_PATHS = re.compile(r"/etc/(postfix/.*\.cf(\.in)?|dovecot/.*\.conf|systemd/system/.*|fail2ban/.*"
                                  r"|unbound/.*\.conf|rspamd/local\.d/.*|tmpfiles\.d/.*|logrotate\.d/.*)")


def without_config_comments(path: str, content: str) -> str:
    """A cluster host's configuration file as its user-data carries it: its first line (which says what the
    file is and that orgmail rendered it) and every line but the other comment lines. A cluster host's user-data
    carries every file, in EC2's 16 KB; the explanations stay in the templates under cloud-init/files."""
    if not CONFIG_COMMENT_PATHS.fullmatch(path) or content.startswith("#!"):
        return content
    first, _, rest = content.partition("\n")
    kept = [line for line in rest.splitlines(keepends=True) if not line.lstrip().startswith("#")]
    return first + "\n" + "".join(kept) if rest or content.endswith("\n") else content


def cluster_user_data(host: ClusterHost, files: list[RenderedFile]) -> str:
    """The cloud-config document of a cluster host: its packages and the files not in its role's bundle."""
    return render_template("user-data.yaml.j2", {**host.__dict__, "cluster_role": host.role,
                                                 "files": [f for f in files if not f.bundle]})


def client_settings(mail_host: str) -> dict[str, object]:
    """What a mail client is set up with (the stack output `clientSettings`): implicit TLS for IMAP, POP3
    and submission, and STARTTLS submission on 587, all at the MX name."""
    return {
        "imap": {"host": mail_host, "port": 993, "security": "SSL/TLS"},
        "pop3": {"host": mail_host, "port": 995, "security": "SSL/TLS"},
        "smtp": [
            {"host": mail_host, "port": 465, "security": "SSL/TLS"},
            {"host": mail_host, "port": 587, "security": "STARTTLS"},
        ],
        "username": "the full e-mail address",
    }
