"""Stack config (`orgmail:` namespace) -> validated, typed settings.

Everything is checked here, before any resource is made. All problems are collected and
reported together in one ConfigError, each line naming the setting and what would be valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import ipaddress
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from components.tiers import TIERS, ClusterSizing

NAMESPACE = "orgmail"
# The Pulumi project (Pulumi.yaml `name`) whose stacks name their account-wide resources by stack name
# alone; a stack of any other project adds a digest of project and stack (Settings.namespace).
DEFAULT_PROJECT = "orgmail"

KNOWN_KEYS = (
    "organization", "tier", "region", "mailHost", "domains", "mailboxes", "aliases",
    "passwordHashes", "dmarc", "admin", "dkimSelector", "dnsTtl", "amiId", "network",
    "rateLimits", "upgrades", "cloudflareAccountId", "mtaSts", "tlsRpt", "caa", "autoconfig", "verify",
    "backup", "dkimRetiring", "spamhausDqsKey", "outbound", "cluster", "defaultQuota", "webmail",
)
MTA_STS_MODES = ("testing", "enforce", "none")
WEBMAIL_KEYS = ("hostname", "requirePasswordChange", "access")
WEBMAIL_ACCESS_KEYS = ("identityProviderIds", "emailDomains", "emails", "sessionDuration")

DMARC_POLICIES = ("none", "quarantine", "reject")
OUTBOUND_RELAYS = ("direct", "ses")
OUTBOUND_KEYS = ("relay", "sesRegion", "sesKeyGeneration", "sesKeyRetiring")
ROLE_ADDRESSES = ("postmaster", "abuse")  # every domain has them (RFC 5321, RFC 2142)
PASSWORD_SCHEMES = ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT")

# Every pattern is used with fullmatch: `$` (with match) would also accept a final newline.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
# The top-level label is letters, or an IDNA A-label such as xn--mgba3a4f16a (.ایران); never all digits.
_FQDN_RE = re.compile(rf"(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}}(?<!-))")
_LOCAL_PART_RE = re.compile(r"[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?")
_ZONE_ID_RE = re.compile(r"[0-9a-f]{32}")
_REGION_RE = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-\d")
_AMI_RE = re.compile(r"ami-[0-9a-f]{8,17}")
_VPC_RE = re.compile(r"vpc-[0-9a-f]{8,17}")
_SUBNET_RE = re.compile(r"subnet-[0-9a-f]{8,17}")
_SELECTOR_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_QUOTA_RE = re.compile(r"([1-9][0-9]{0,5})([MGT])")
UNLIMITED = "unlimited"  # a quota that says so: no mailbox is unlimited unless configured
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # a Cloudflare Access IdP id
_DURATION_RE = re.compile(r"([1-9][0-9]{0,3})(m|h)")  # an Access session: minutes or hours
_DQS_KEY_RE = re.compile(r"[a-z0-9]{26}")  # a Spamhaus Data Query Service key
_ORG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .,&'()-]{0,63}")
_HASH_RE = {
    "ARGON2ID": re.compile(r"\{ARGON2ID\}\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"),
    "BLF-CRYPT": re.compile(r"\{BLF-CRYPT\}\$2[aby]\$(1[0-9]|0[89]|[23][0-9])\$[./A-Za-z0-9]{53}"),
    "SHA512-CRYPT": re.compile(r"\{SHA512-CRYPT\}\$6\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}"),
}
# C0 and C1 controls (U+0085 NEXT LINE among them), DEL, and the Unicode line and paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines() breaks
# RFC 5892's LetterDigits: the general categories a valid internationalised label is made of.
_IDNA_CATEGORIES = ("Ll", "Lu", "Lo", "Lm", "Mn", "Mc", "Nd")


class ConfigError(Exception):
    """Invalid stack config. The message names every bad setting and what is valid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid orgmail stack config ({len(problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class Domain:
    name: str
    zone_id: str


@dataclass(frozen=True)
class Mailbox:
    address: str
    quota: str | None  # Dovecot size, e.g. "2G"; None = unlimited
    aliases: tuple[str, ...]
    # A shared mailbox (e.g. team@): no login of its own; these mailboxes' users see it in their clients
    # under Shared/<address>/ and may send as it.
    shared_with: tuple[str, ...] = ()
    # Outside addresses that get a copy of every message the mailbox receives (it keeps its own).
    forward_copy_to: tuple[str, ...] = ()

    @property
    def domain(self) -> str:
        return self.address.split("@", 1)[1]


@dataclass(frozen=True)
class Dmarc:
    policy: str
    subdomain_policy: str
    report_address: str
    percent: int


@dataclass(frozen=True)
class Admin:
    email: str
    ssm_session_manager: bool
    ssh_cidrs: tuple[str, ...]
    trusted_networks: tuple[str, ...] = ()  # never banned by fail2ban (office NAT addresses)


@dataclass(frozen=True)
class RateLimits:
    """Postfix anvil limits per client address, per 60 s window (port 25; on 465/587 only the AUTH
    limit), and rspamd's per-login hourly limits of authenticated submission (day-2: through SSM)."""

    connections_per_minute: int
    messages_per_minute: int
    recipients_per_minute: int
    auth_per_minute: int
    recipients_per_message: int
    message_size_mb: int
    messages_per_user_hour: int
    recipients_per_user_hour: int


@dataclass(frozen=True)
class Upgrades:
    auto_reboot: bool
    reboot_time: str  # HH:MM, host local time (UTC on EC2)


@dataclass(frozen=True)
class Publishing:
    """What the stack publishes beyond the core mail records (MTA-STS, TLS-RPT, CAA, autoconfig)."""

    cloudflare_account_id: str  # where the Workers live: ACME challenges, MTA-STS and autoconfig
    mta_sts_mode: str  # testing | enforce | none
    mta_sts_max_age: int  # seconds
    tls_rpt_address: str
    caa_iodef: str | None
    autoconfig: bool


@dataclass(frozen=True)
class VerifyAfterDeploy:
    """Run tools/verify after `pulumi up` (pulumi-command), reporting without failing by default."""

    enabled: bool
    fail_deploy: bool
    skip_host: bool  # the machine running `pulumi up` often cannot reach port 25


@dataclass(frozen=True)
class Backup:
    """Backups: restic to the stack's S3 bucket (nightly), EBS snapshots (daily), recovery alarms."""

    keep_daily: int  # restic snapshots kept: one per day for this many days
    keep_weekly: int
    keep_monthly: int
    snapshot_days: int  # daily EBS snapshots of the mail-data volume kept (Data Lifecycle Manager)
    noncurrent_days: int  # S3 noncurrent object versions expire after this many days
    alarm_email: bool  # send CloudWatch alarm notifications to admin.email (SNS)


@dataclass(frozen=True)
class Outbound:
    """How mail to outside domains leaves the mailbox host: `direct` (port 25 from the host itself) or
    `ses` (relayed through Amazon SES on 587 in `ses_region`, components/ses.py)."""

    relay: str = "direct"
    ses_region: str | None = None  # set with relay "ses" only: the stack's region unless given
    # The SES SMTP key's generation: a new number makes a new key (README, "Rotate the SES SMTP key").
    ses_key_generation: int = 1
    # An earlier generation whose key stays active until it is removed from the settings (rotation's step 2).
    ses_key_retiring: int | None = None

    @property
    def ses(self) -> bool:
        return self.relay == "ses"

    @property
    def ses_key_generations(self) -> tuple[int, ...]:
        """Every generation with a live key: the current one first, then the retiring one."""
        retiring = () if self.ses_key_retiring is None else (self.ses_key_retiring,)
        return (self.ses_key_generation, *retiring) if self.ses else ()


@dataclass(frozen=True)
class WebmailAccess:
    """A Cloudflare Access application in front of webmail: who passes, through which identity providers."""

    identity_provider_ids: tuple[str, ...]  # the account's Access identity providers (Google, Microsoft, OIDC)
    email_domains: tuple[str, ...]  # anyone whose verified address is in one of these domains passes
    emails: tuple[str, ...]  # and these addresses
    session_duration: str  # like 24h: how long Access trusts a login


@dataclass(frozen=True)
class Webmail:
    """Roundcube on the mailbox host's loopback, published through a Cloudflare Tunnel (components/webmail.py)."""

    hostname: str  # the web name, in one of the zones
    # A password from the config (generated or a hash) logs in to webmail only, until the user changes it there.
    require_password_change: bool = True
    access: WebmailAccess | None = None


BACKUP_DEFAULTS = Backup(keep_daily=7, keep_weekly=4, keep_monthly=12, snapshot_days=7, noncurrent_days=30,
                         alarm_email=False)


@dataclass(frozen=True)
class Settings:
    stack: str
    organization: str
    tier: str
    region: str
    mail_host: str
    domains: tuple[Domain, ...]
    mailboxes: tuple[Mailbox, ...]
    aliases: dict[str, tuple[str, ...]]
    password_hashes: dict[str, str]
    dmarc: Dmarc
    admin: Admin
    dkim_selector: str
    dns_ttl: int
    ami_id: str | None
    vpc_id: str | None
    subnet_id: str | None
    rate_limits: RateLimits
    upgrades: Upgrades
    publishing: Publishing
    verify: VerifyAfterDeploy
    backup: Backup = BACKUP_DEFAULTS
    # Selectors no longer signed with -> the date (YYYY-MM-DD) until which their key stays published.
    dkim_retiring: dict[str, str] = dataclasses.field(default_factory=dict)
    spamhaus_dqs_key: str | None = None  # secret: postscreen and rspamd query Spamhaus's DQS zones with it
    outbound: Outbound = Outbound()
    project: str = DEFAULT_PROJECT  # the Pulumi project (Pulumi.yaml `name`)
    # orgmail:cluster (tier isp only): the ISP tier as a cluster (components/cluster.py); None: single host.
    cluster: ClusterSizing | None = None
    webmail: Webmail | None = None  # orgmail:webmail; None: no webmail

    @property
    def namespace(self) -> str:
        """What names the stack's resources that must be unique in the AWS or Cloudflare account (SSM path,
        Worker names, AMI copy, snapshot and metric dimensions): the stack name in project `orgmail`, as
        always; in any other project `<stack>-<6 hex of sha256("<project>/<stack>")>`, so the same stack
        name in two projects of one account never shares them (README, "Several stacks in one account")."""
        if self.project == DEFAULT_PROJECT:
            return self.stack
        return f"{self.stack}-{hashlib.sha256(f'{self.project}/{self.stack}'.encode()).hexdigest()[:6]}"

    @property
    def dkim_selectors(self) -> tuple[str, ...]:
        """Every selector whose key is published: the signing one first, then the retiring ones."""
        return (self.dkim_selector, *sorted(self.dkim_retiring))

    @property
    def primary_domain(self) -> Domain:
        """The domain whose zone holds the mail host name."""
        return zone_of(self.mail_host, self.domains)  # type: ignore[return-value]

    @property
    def ssm_path(self) -> str:
        return f"/orgmail/{self.namespace}"

    @property
    def relay_hosts(self) -> tuple[str, ...]:
        """Backup-MX relay names: mx2.<zone>, mx3.<zone>, ... in the mail host's zone (none in a cluster,
        whose one MX name is the load balancer's)."""
        if self.cluster is not None:
            return ()
        count = TIERS[self.tier].host_count
        return tuple(f"mx{n}.{self.primary_domain.name}" for n in range(2, count + 1))

    @property
    def outbound_relays(self) -> tuple[str, ...]:
        """A cluster's outbound relays: relay1.<zone>, relay2.<zone>, ... in the mail host's zone."""
        if self.cluster is None:
            return ()
        return tuple(f"relay{n}.{self.primary_domain.name}" for n in range(1, self.cluster.relays + 1))

    @property
    def shard_hosts(self) -> tuple[str, ...]:
        """A cluster's mailbox backends: shard1.<zone>, ... (names inside the VPC; no public record)."""
        if self.cluster is None:
            return ()
        return tuple(f"shard{n}.{self.primary_domain.name}" for n in range(1, self.cluster.shards + 1))

    @property
    def host_roles(self) -> tuple[str, ...]:
        """The host roles the stack has: the mailbox host, and relays from the large tier up; in a cluster
        its edges, shards and outbound relays."""
        if self.cluster is not None:
            return ("edge", "shard", "relay")
        return ("mailbox", "relay") if self.relay_hosts else ("mailbox",)

    @property
    def mx_priorities(self) -> tuple[int, ...]:
        """The MX priority of each of mx_hosts (10, 20, 30)."""
        return TIERS[self.tier].mx_priorities[:len(self.mx_hosts)]

    @property
    def mx_hosts(self) -> tuple[str, ...]:
        return (self.mail_host, *self.relay_hosts)

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every address mail is accepted for: mailboxes, their aliases, standalone aliases."""
        found: list[str] = []
        for m in self.mailboxes:
            found += [m.address, *m.aliases]
        found += list(self.aliases)
        return tuple(sorted(set(found)))


def zone_of(host: str, domains: tuple[Domain, ...]) -> Domain | None:
    """The most specific configured domain that `host` lies in (or is)."""
    best: Domain | None = None
    for d in domains:
        if (host == d.name or host.endswith("." + d.name)) and (best is None or len(d.name) > len(best.name)):
            best = d
    return best


# Provider credentials never live in stack config: every `pulumi preview` (pull requests included)
# holds the passphrase that decrypts it. The deploying tokens come from the deploy job's GitHub
# environment as environment variables (docs/pull-requests.md).
PROVIDER_CREDENTIALS: dict[str, str] = {
    "cloudflare:apiToken": "CLOUDFLARE_API_TOKEN", "cloudflare:apiKey": "CLOUDFLARE_API_KEY",
    "cloudflare:apiUserServiceKey": "CLOUDFLARE_API_USER_SERVICE_KEY",
    "aws:accessKey": "AWS_ACCESS_KEY_ID", "aws:secretKey": "AWS_SECRET_ACCESS_KEY", "aws:token": "AWS_SESSION_TOKEN",
}


def refuse_provider_credentials(keys: Iterable[str]) -> None:
    """ConfigError naming each provider credential set in the stack config (secure or not)."""
    found = sorted(set(keys) & set(PROVIDER_CREDENTIALS))
    if found:
        raise ConfigError([
            f"{key}: a provider credential must not be in the stack config (any preview can decrypt it); "
            f"remove it (pulumi config rm {key}) and give the deploy job {PROVIDER_CREDENTIALS[key]} instead"
            for key in found])


def raw_from_pulumi_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`orgmail:key` entries of a Pulumi config map -> {key: parsed value}.

    Pulumi hands object values to the program as JSON text; scalars stay strings.
    """
    raw: dict[str, Any] = {}
    for full_key, value in config.items():
        ns, _, key = full_key.partition(":")
        if ns != NAMESPACE or not key:
            continue
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        raw[key] = value
    return raw


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, setting: str, message: str) -> None:
        # One line per problem, whatever a (bad) setting name holds.
        self.problems.append(_escape_controls(f"{NAMESPACE}:{setting}: {message}"))


def _nearest(name: Any, valid: tuple[str, ...]) -> str | None:
    """The valid name a misspelled one was most likely meant as (case ignored), or None."""
    lowered = {v.lower(): v for v in valid}
    found = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[found[0]] if found else None


def _read_as_meant(c: _Checker, obj: Mapping[str, Any], where: str, valid: tuple[str, ...],
                   kind: str = "keys") -> dict[str, Any]:
    """Report every unknown key of `obj` (with the nearest valid name) and return `obj` read as meant:
    a misspelled key whose valid name is not also given is checked under that name, so the checks
    that follow report only problems of their own, not the ones that follow from the typo."""
    meant: dict[str, Any] = {k: v for k, v in obj.items() if k in valid}
    for key, value in obj.items():
        if key in valid:
            continue
        setting = f"{where}.{key}" if where else str(key)
        guess = _nearest(key, valid)
        if guess is not None:
            c.fail(setting, f"unknown setting; did you mean {guess}? (the rest was checked as if it were)")
            if guess not in obj:
                meant[guess] = value
        else:
            c.fail(setting, f"unknown setting; valid {kind} are {', '.join(valid)}")
    return meant


def _flat_dotted(c: _Checker, raw: Mapping[str, Any]) -> dict[str, Any]:
    """`orgmail:dmarc.policy: reject` written flat (the settings table's dotted names): report it with
    the nested form the stack file needs, and read it as nested."""
    meant: dict[str, Any] = dict(raw)
    for key, value in raw.items():
        parent, dot, child = str(key).partition(".")
        if key in KNOWN_KEYS or not dot or parent not in KNOWN_KEYS:
            continue
        c.fail(str(key), f"write it nested: `{NAMESPACE}:{parent}:` with `{child}: {json.dumps(value)}` indented "
                         f"under it (or `pulumi config set --path '{NAMESPACE}:{key}' ...`)")
        del meant[key]
        nested = meant.get(parent, {})
        if "." not in child and isinstance(nested, dict) and child not in nested:
            meant[parent] = {**nested, child: value}
    return meant


def _escape_controls(text: str) -> str:
    return _CONTROL_RE.sub(lambda m: ascii(m.group())[1:-1], text)


def _control_characters(c: _Checker, value: Any, setting: str) -> None:
    """Every string in the config, map keys included, free of control characters and line breaks.

    The message shows the character and where it is, never the value (passwordHashes are secret).
    """
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{setting}.{key}" if setting else str(key)
            if isinstance(key, str) and (found := _CONTROL_RE.search(key)):
                c.fail(where, f"the key {_control_problem(found)}")
            _control_characters(c, item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _control_characters(c, item, f"{setting}[{i}]")
    elif isinstance(value, str) and (found := _CONTROL_RE.search(value)):
        c.fail(setting, _control_problem(found))


def _control_problem(found: re.Match[str]) -> str:
    char = found.group()
    kind = "a line break" if char in _LINE_BREAKS else "a control character"
    return f"contains {kind} ({ascii(char)[1:-1]}) at character {found.start() + 1}; remove it"


def _a_label_problem(label: str) -> str | None:
    """Why `label` (xn--...) is not the A-label of a valid internationalised label, or None.

    Python's idna codec implements IDNA 2003, whose mapping refuses names registries accept under
    IDNA 2008 (faß.de = xn--fa-hia.de, final sigma); so decode the punycode (RFC 3492) and check the
    label against RFC 5892's rules: letters, marks and digits only, unchanged by NFKC and lower-casing.
    """
    try:
        u_label = label[4:].encode("ascii").decode("punycode")
    except ValueError:  # UnicodeError
        return "not valid punycode"
    if u_label.isascii() or u_label.encode("punycode").decode("ascii") != label[4:]:
        return "not the punycode form of an internationalised label"
    if not unicodedata.is_normalized("NFC", u_label):
        return f"decodes to {u_label!r}, not in Unicode normal form NFC"
    for char in u_label:
        if char != "-" and (unicodedata.category(char) not in _IDNA_CATEGORIES
                            or unicodedata.normalize("NFKC", char).lower() != char):
            return f"decodes to {u_label!r}, whose U+{ord(char):04X} is not allowed in domain names"
    return None


def _idna_hint(value: Any) -> str:
    """'; <why>' for every xn-- label of a name or address that is not a valid A-label, else ''."""
    if not isinstance(value, str):
        return ""
    hints = [f"; {label} is not a valid IDNA A-label ({why}); use the xn-- form your registrar shows"
             for label in re.split(r"[.@]", value) if label.startswith("xn--") and (why := _a_label_problem(label))]
    return "".join(hints)


def _is_fqdn(value: Any) -> bool:
    return (isinstance(value, str) and len(value) <= 253 and bool(_FQDN_RE.fullmatch(value))
            and not any(_a_label_problem(label) for label in value.split(".") if label.startswith("xn--")))


def _split_address(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, str) or value.count("@") != 1:
        return None
    local, domain = value.split("@")
    if not _LOCAL_PART_RE.fullmatch(local) or not _is_fqdn(domain):
        return None
    return local, domain


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return None


def _int_setting(c: _Checker, obj: Mapping[str, Any], key: str, setting: str,
                 default: int, lo: int, hi: int) -> int:
    if key not in obj:
        return default
    value = _as_int(obj[key])
    if value is None or not lo <= value <= hi:
        c.fail(setting, f"must be a whole number from {lo} to {hi}, got {obj[key]!r}")
        return default
    return value


def _object(c: _Checker, raw: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    value = raw.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        c.fail(key, f"must be an object with keys {', '.join(allowed)}")
        return {}
    return _read_as_meant(c, value, key, allowed)


def _domains(c: _Checker, raw: Mapping[str, Any]) -> tuple[Domain, ...]:
    value = raw.get("domains")
    if not isinstance(value, list) or not value:
        c.fail("domains", "required: a list of {name: <mail domain>, zoneId: <32-hex Cloudflare zone id>}")
        return ()
    found: list[Domain] = []
    for i, item in enumerate(value):
        where = f"domains[{i}]"
        if not isinstance(item, dict):
            c.fail(where, "must be an object {name, zoneId}")
            continue
        item = _read_as_meant(c, item, where, ("name", "zoneId"))
        name = item.get("name")
        zone = item.get("zoneId")
        ok = True
        if not _is_fqdn(name):
            c.fail(f"{where}.name", f"must be a lower-case domain name like example.org, got {name!r}{_idna_hint(name)}")
            ok = False
        elif any(d.name == name for d in found):
            c.fail(f"{where}.name", f"duplicate domain {name!r}; list each mail domain once")
            ok = False
        if zone is None:
            c.fail(f"{where}.zoneId", "missing: the Cloudflare zone id (32 hex characters) of this domain")
            ok = False
        elif not isinstance(zone, str) or not _ZONE_ID_RE.fullmatch(zone):
            c.fail(f"{where}.zoneId", f"must be 32 lower-case hex characters (Cloudflare zone id; quote it in YAML), got {zone!r}")
            ok = False
        if ok:
            found.append(Domain(name=str(name), zone_id=str(zone)))
    for i, d in enumerate(found):
        for parent in found:
            if d.name.endswith("." + parent.name) and d.zone_id != parent.zone_id:
                c.fail(f"domains[{i}].zoneId",
                       f"{d.name} lies inside {parent.name} but names a zone of its own; Cloudflare serves a zone "
                       f"under another zone only with a subdomain entitlement (Enterprise). Give it {parent.name}'s "
                       "zoneId (its records then live in that zone) or use a domain of its own")
    return tuple(found)


def _in_domains(address: str, domains: tuple[Domain, ...]) -> bool:
    return any(address.endswith("@" + d.name) for d in domains)


def _quota(c: _Checker, value: Any, where: str, default: str | None) -> str | None:
    """A quota setting: a size (500M, 2G, 1T), `unlimited` (None) or unset (`default`)."""
    if value is None:
        return default
    if value == UNLIMITED:
        return None
    if not isinstance(value, str) or not _QUOTA_RE.fullmatch(value):
        c.fail(where, f"must be a size like 500M, 2G or 1T, or {UNLIMITED}, got {value!r}")
        return default
    return value


def _mailboxes(c: _Checker, raw: Mapping[str, Any], domains: tuple[Domain, ...],
               default_quota: str | None) -> tuple[Mailbox, ...]:
    value = raw.get("mailboxes", [])
    if not isinstance(value, list):
        c.fail("mailboxes", "must be a list of {address, quota?, aliases?, sharedWith?, forwardCopyTo?}")
        return ()
    names = ", ".join(d.name for d in domains) or "(none configured)"
    found: list[Mailbox] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        where = f"mailboxes[{i}]"
        if not isinstance(item, dict):
            c.fail(where, "must be an object {address, quota?, aliases?, sharedWith?, forwardCopyTo?}")
            continue
        item = _read_as_meant(c, item, where, ("address", "quota", "aliases", "sharedWith", "forwardCopyTo"))
        address = str(item.get("address"))
        if _split_address(item.get("address")) is None:
            c.fail(f"{where}.address", f"must be a lower-case address like ann@example.org, got {address!r}{_idna_hint(address)}")
            continue
        if domains and not _in_domains(address, domains):
            c.fail(f"{where}.address", f"{address} is outside the configured domains ({names})")
            continue
        if address in seen:
            c.fail(f"{where}.address", f"duplicate mailbox {address}")
            continue
        seen.add(address)
        quota = _quota(c, item.get("quota"), f"{where}.quota", default_quota)
        aliases = _address_list(
            c, item.get("aliases", []), f"{where}.aliases", "addresses", "info@example.org",
            lambda a: None if not domains or _in_domains(a, domains) else f"{a} is outside the configured domains ({names})")
        members = _address_list(c, item.get("sharedWith", []), f"{where}.sharedWith",
                                "the mailboxes whose users share this one", "ann@example.org", lambda a: None)
        copies = _address_list(
            c, item.get("forwardCopyTo", []), f"{where}.forwardCopyTo",
            "outside addresses that get a copy of this mailbox's mail", "ann@elsewhere.example",
            lambda a: f"{a} is in a configured domain; for a copy inside the stack make a group alias in orgmail:aliases"
            if _in_domains(a, domains) else None)
        found.append(Mailbox(address=address, quota=quota, aliases=tuple(aliases), shared_with=tuple(members),
                             forward_copy_to=tuple(copies)))
    _shared_members(c, found)
    return tuple(found)


def _address_list(c: _Checker, value: Any, where: str, meaning: str, like: str,
                  problem: Callable[[str], str | None]) -> list[str]:
    """A mailbox's list of addresses: each checked whole, each given once; `problem` says what else makes
    one wrong (None: nothing)."""
    if not isinstance(value, list):
        c.fail(where, f"must be a list of {meaning}")
        return []
    found: list[str] = []
    for j, address in enumerate(value):
        if _split_address(address) is None:
            c.fail(f"{where}[{j}]", f"must be an address like {like}, got {address!r}{_idna_hint(address)}")
        elif why := problem(address):
            c.fail(f"{where}[{j}]", why)
        elif address in found:
            c.fail(f"{where}[{j}]", f"{address} is listed twice")
        else:
            found.append(address)
    return found


def _shared_members(c: _Checker, mailboxes: list[Mailbox]) -> None:
    """Who may share a mailbox: other mailboxes of the stack that have a login (a shared one has none)."""
    shared = {m.address for m in mailboxes if m.shared_with}
    boxes = {m.address for m in mailboxes}
    for i, m in enumerate(mailboxes):
        for j, member in enumerate(m.shared_with):
            where = f"mailboxes[{i}].sharedWith[{j}]"
            if member == m.address:
                c.fail(where, f"{member} is this shared mailbox itself")
            elif member in shared:
                c.fail(where, f"{member} is a shared mailbox itself, with no login; list the mailboxes of its users")
            elif member not in boxes:
                c.fail(where, f"{member} is not a mailbox of this stack; a mailbox is shared with the users of other "
                              "mailboxes (an alias or an outside address has no login)")


def _aliases(c: _Checker, raw: Mapping[str, Any], domains: tuple[Domain, ...],
             mailboxes: tuple[Mailbox, ...], directory: bool = False) -> dict[str, tuple[str, ...]]:
    """orgmail:aliases. With `directory` (a cluster) a target in a configured domain may be a user of the
    directory, which the config cannot see."""
    value = raw.get("aliases", {})
    if not isinstance(value, dict):
        c.fail("aliases", "must be a map of alias address -> list of target addresses")
        return {}
    names = ", ".join(d.name for d in domains) or "(none configured)"
    boxes = {m.address for m in mailboxes}
    mailbox_aliases = {a: m.address for m in mailboxes for a in m.aliases}
    result: dict[str, tuple[str, ...]] = {}
    for alias, targets in value.items():
        where = f"aliases.{alias}"
        if _split_address(alias) is None:
            c.fail(where, f"the alias must be an address like sales@example.org{_idna_hint(alias)}")
            continue
        if domains and not _in_domains(alias, domains):
            c.fail(where, f"{alias} is outside the configured domains ({names})")
            continue
        if alias in boxes:
            c.fail(where, f"{alias} is already a mailbox; an address is either a mailbox or an alias")
            continue
        if alias in mailbox_aliases:
            c.fail(where, f"{alias} is already an alias of mailbox {mailbox_aliases[alias]}")
            continue
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            c.fail(where, "must list at least one target address")
            continue
        good: list[str] = []
        for t in targets:
            if _split_address(t) is None:
                c.fail(where, f"target {t!r} is not an address like ann@example.org{_idna_hint(t)}")
            elif (not directory and _in_domains(t, domains) and t not in boxes and t not in value
                  and t not in mailbox_aliases):
                c.fail(where, f"target {t} is in a configured domain but is neither a mailbox nor an alias")
            else:
                good.append(t)
        result[alias] = tuple(good)
    for m in mailboxes:
        for a in m.aliases:
            if a in boxes:
                c.fail("mailboxes", f"alias {a} of {m.address} is itself a mailbox")
    given = Counter(a for m in mailboxes for a in set(m.aliases))
    for a in sorted(a for a, n in given.items() if n > 1):
        c.fail("mailboxes", f"alias {a} is given to more than one mailbox; use orgmail:aliases for a list")
    _check_alias_loops(c, result)
    return result


def _check_alias_loops(c: _Checker, aliases: dict[str, tuple[str, ...]]) -> None:
    reported: set[frozenset[str]] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node):] + [node]
            key = frozenset(cycle)
            if key not in reported:
                reported.add(key)
                c.fail("aliases", f"alias loop {' -> '.join(cycle)}; every alias must end in a mailbox or an outside address")
            return
        for t in aliases.get(node, ()):
            visit(t, path + [node])

    for alias in aliases:
        visit(alias, [])


def _role_aliases(c: _Checker, domains: tuple[Domain, ...], mailboxes: tuple[Mailbox, ...],
                  aliases: dict[str, tuple[str, ...]], admin: Admin, dmarc: Dmarc,
                  publishing: Publishing, cluster: bool = False) -> dict[str, tuple[str, ...]]:
    """Aliases to admin.email for every address others must be able to reach that the config does not
    define: postmaster@ and abuse@ of each domain (RFC 5321 4.5.1, RFC 2142) and each report address
    the stack publishes inside a hosted domain (DMARC and TLS-RPT rua, CAA iodef). In a cluster,
    admin.email may be a user of the directory (made with the CLI), which the config cannot see."""
    defined = {m.address for m in mailboxes} | {a for m in mailboxes for a in m.aliases} | set(aliases)
    if not cluster and _in_domains(admin.email, domains) and admin.email not in defined:
        c.fail("admin.email", f"{admin.email} is in a configured domain but is neither a mailbox nor an alias; "
                              "postmaster, abuse and report mail goes there")
        return {}
    wanted = [f"{role}@{d.name}" for d in domains for role in ROLE_ADDRESSES]
    wanted += [dmarc.report_address, publishing.tls_rpt_address, *filter(None, [publishing.caa_iodef])]
    return {a: (admin.email,) for a in wanted if _in_domains(a, domains) and a not in defined and a != admin.email}


def _password_hashes(c: _Checker, raw: Mapping[str, Any], mailboxes: tuple[Mailbox, ...]) -> dict[str, str]:
    value = raw.get("passwordHashes", {})
    if not isinstance(value, dict):
        c.fail("passwordHashes", "must be a (secret) map of mailbox address -> Dovecot password hash")
        return {}
    boxes = {m.address for m in mailboxes}
    shared = {m.address for m in mailboxes if m.shared_with}
    result: dict[str, str] = {}
    for address, hashed in value.items():
        if address not in boxes:
            # Never echo the value: it is a secret.
            c.fail(f"passwordHashes.{address}", "no such mailbox in orgmail:mailboxes")
            continue
        if address in shared:
            c.fail(f"passwordHashes.{address}", "a shared mailbox has no login of its own (its users log in as "
                                                "themselves and find it under Shared/); remove the hash")
            continue
        scheme = hashed[1:].split("}", 1)[0] if isinstance(hashed, str) and hashed.startswith("{") else ""
        if scheme not in _HASH_RE or not _HASH_RE[scheme].fullmatch(hashed):
            c.fail(f"passwordHashes.{address}",
                   f"must be a Dovecot hash with scheme {', '.join(PASSWORD_SCHEMES)} "
                   "(e.g. from `doveadm pw -s BLF-CRYPT`); value not shown")
            continue
        result[address] = hashed
    return result


def _dmarc(c: _Checker, raw: Mapping[str, Any], domains: tuple[Domain, ...], admin_email: str) -> Dmarc:
    obj = _object(c, raw, "dmarc", ("policy", "subdomainPolicy", "reportAddress", "percent"))
    policy = obj.get("policy", "quarantine")
    if policy not in DMARC_POLICIES:
        c.fail("dmarc.policy", f"must be one of {', '.join(DMARC_POLICIES)}, got {policy!r}")
        policy = "quarantine"
    sub = obj.get("subdomainPolicy", policy)
    if sub not in DMARC_POLICIES:
        c.fail("dmarc.subdomainPolicy", f"must be one of {', '.join(DMARC_POLICIES)}, got {sub!r}")
        sub = policy
    report = obj.get("reportAddress", admin_email)
    if _split_address(report) is None:
        c.fail("dmarc.reportAddress", f"must be an address like dmarc@example.org, got {report!r}{_idna_hint(report)}")
    percent = _int_setting(c, obj, "percent", "dmarc.percent", 100, 1, 100)
    return Dmarc(policy=policy, subdomain_policy=sub, report_address=str(report), percent=percent)


def _dkim_retiring(c: _Checker, raw: Mapping[str, Any], selector: str) -> dict[str, str]:
    """dkimRetiring: selector -> YYYY-MM-DD. Each keeps its key and DKIM records published (not signed
    with) until that date, for mail signed with it that is still on its way or re-checked later."""
    value = raw.get("dkimRetiring", {})
    if not isinstance(value, dict):
        c.fail("dkimRetiring", "must be a map of old selector -> date (YYYY-MM-DD) until which its key stays published")
        return {}
    result: dict[str, str] = {}
    for old, until in value.items():
        where = f"dkimRetiring.{old}"
        if not isinstance(old, str) or not _SELECTOR_RE.fullmatch(old):
            c.fail(where, "the selector must be a DNS label of lower-case letters, digits and '-'")
            continue
        if old == selector:
            c.fail(where, f"{old} is orgmail:dkimSelector, the selector the host signs with; list only selectors "
                          "it no longer signs with")
            continue
        date = str(until)
        try:
            ok = bool(_DATE_RE.fullmatch(date)) and datetime.date.fromisoformat(date) is not None
        except ValueError:
            ok = False
        if not ok:
            c.fail(where, f"must be a date YYYY-MM-DD until which the old key stays published, got {until!r}")
            continue
        result[old] = date
    return dict(sorted(result.items()))


def _admin(c: _Checker, raw: Mapping[str, Any]) -> Admin:
    obj = _object(c, raw, "admin", ("email", "ssm", "sshCidrs", "trustedNetworks"))
    email = obj.get("email")
    if _split_address(email) is None:
        c.fail("admin.email", f"required: the administrator's address (certificates, reports, alarms), got {email!r}"
                               f"{_idna_hint(email)}")
        email = ""
    ssm = _as_bool(obj.get("ssm", True))
    if ssm is None:
        c.fail("admin.ssm", f"must be true or false, got {obj.get('ssm')!r}")
        ssm = True
    ssh = _networks(c, obj, "sshCidrs", "(empty: no SSH)", "is too wide for SSH",
                    everything="opens SSH to the whole internet; give your admin networks, or use SSM (admin.ssm: true)")
    # Networks fail2ban never bans: as narrow as admin.sshCidrs.
    trusted = _networks(c, obj, "trustedNetworks", "(empty: none)", "is too wide: nobody there could be banned")
    return Admin(email=str(email), ssm_session_manager=ssm, ssh_cidrs=ssh, trusted_networks=trusted)


def _networks(c: _Checker, obj: Mapping[str, Any], key: str, empty: str, too_wide: str,
              everything: str | None = None) -> tuple[str, ...]:
    """admin.<key>: a list of networks no wider than /8 (IPv4) or /16 (IPv6)."""
    raw = obj.get(key, [])
    if not isinstance(raw, list):
        c.fail(f"admin.{key}", f"must be a list of CIDRs like 203.0.113.0/24 {empty}")
        return ()
    nets: list[str] = []
    for i, cidr in enumerate(raw):
        where = f"admin.{key}[{i}]"
        try:
            net = ipaddress.ip_network(str(cidr), strict=True)
        except ValueError:
            c.fail(where, f"must be a network like 203.0.113.0/24 or 2001:db8::/48 with no host bits set, got {cidr!r}")
            continue
        if net.prefixlen == 0 and everything:
            c.fail(where, f"{cidr} {everything}")
            continue
        if (net.version == 4 and net.prefixlen < 8) or (net.version == 6 and net.prefixlen < 16):
            c.fail(where, f"{cidr} {too_wide}; use at most /8 (IPv4) or /16 (IPv6)")
            continue
        nets.append(str(net))
    return tuple(nets)


DEFAULT_RATE_LIMITS = RateLimits(connections_per_minute=10, messages_per_minute=60, recipients_per_minute=200,
                                 auth_per_minute=10, recipients_per_message=100, message_size_mb=25,
                                 messages_per_user_hour=200, recipients_per_user_hour=1000)


def _rate_limits(c: _Checker, raw: Mapping[str, Any]) -> RateLimits:
    keys = ("connectionsPerMinute", "messagesPerMinute", "recipientsPerMinute", "authPerMinute",
            "recipientsPerMessage", "messageSizeMb", "messagesPerUserHour", "recipientsPerUserHour")
    obj = _object(c, raw, "rateLimits", keys)
    d = DEFAULT_RATE_LIMITS
    limits = RateLimits(
        connections_per_minute=_int_setting(c, obj, "connectionsPerMinute", "rateLimits.connectionsPerMinute",
                                            d.connections_per_minute, 1, 10000),
        messages_per_minute=_int_setting(c, obj, "messagesPerMinute", "rateLimits.messagesPerMinute",
                                         d.messages_per_minute, 1, 100000),
        recipients_per_minute=_int_setting(c, obj, "recipientsPerMinute", "rateLimits.recipientsPerMinute",
                                           d.recipients_per_minute, 1, 100000),
        auth_per_minute=_int_setting(c, obj, "authPerMinute", "rateLimits.authPerMinute", d.auth_per_minute, 1, 10000),
        recipients_per_message=_int_setting(c, obj, "recipientsPerMessage", "rateLimits.recipientsPerMessage",
                                            d.recipients_per_message, 1, 10000),
        message_size_mb=_int_setting(c, obj, "messageSizeMb", "rateLimits.messageSizeMb", d.message_size_mb, 1, 200),
        messages_per_user_hour=_int_setting(c, obj, "messagesPerUserHour", "rateLimits.messagesPerUserHour",
                                            d.messages_per_user_hour, 1, 1000000),
        recipients_per_user_hour=_int_setting(c, obj, "recipientsPerUserHour", "rateLimits.recipientsPerUserHour",
                                              d.recipients_per_user_hour, 1, 1000000),
    )
    if limits.recipients_per_user_hour < limits.recipients_per_message:
        c.fail("rateLimits.recipientsPerUserHour", f"must be at least rateLimits.recipientsPerMessage "
               f"({limits.recipients_per_message}): a message to that many recipients could never be sent")
    return limits


def _upgrades(c: _Checker, raw: Mapping[str, Any]) -> Upgrades:
    obj = _object(c, raw, "upgrades", ("autoReboot", "rebootTime"))
    auto = _as_bool(obj.get("autoReboot", True))
    if auto is None:
        c.fail("upgrades.autoReboot", f"must be true or false, got {obj.get('autoReboot')!r}")
        auto = True
    time = obj.get("rebootTime", "04:30")
    if not isinstance(time, str) or not _TIME_RE.fullmatch(time):
        c.fail("upgrades.rebootTime", f"must be a time HH:MM (UTC) like 04:30, got {time!r}")
        time = "04:30"
    return Upgrades(auto_reboot=auto, reboot_time=time)


def _publishing(c: _Checker, raw: Mapping[str, Any], dmarc: Dmarc) -> Publishing:
    sts = _object(c, raw, "mtaSts", ("mode", "maxAgeDays"))
    mode = sts.get("mode", "testing")
    if mode not in MTA_STS_MODES:
        c.fail("mtaSts.mode", f"must be one of {', '.join(MTA_STS_MODES)}, got {mode!r}")
        mode = "testing"
    max_age_days = _int_setting(c, sts, "maxAgeDays", "mtaSts.maxAgeDays", 7, 1, 365)
    rpt = _object(c, raw, "tlsRpt", ("reportAddress",))
    rpt_address = rpt.get("reportAddress", dmarc.report_address)
    if _split_address(rpt_address) is None:
        c.fail("tlsRpt.reportAddress", f"must be an address like tls-reports@example.org, got {rpt_address!r}{_idna_hint(rpt_address)}")
    caa = _object(c, raw, "caa", ("iodef",))
    iodef = caa.get("iodef")
    if iodef is not None and _split_address(iodef) is None:
        c.fail("caa.iodef", f"must be an address for CA incident reports, got {iodef!r}{_idna_hint(iodef)}")
    autoconfig = _as_bool(raw.get("autoconfig", True))
    if autoconfig is None:
        c.fail("autoconfig", f"must be true or false, got {raw.get('autoconfig')!r}")
        autoconfig = True
    account = raw.get("cloudflareAccountId")
    if account is not None and (not isinstance(account, str) or not _ZONE_ID_RE.fullmatch(account)):
        c.fail("cloudflareAccountId", f"must be 32 lower-case hex characters (Cloudflare account id), got {account!r}")
    elif account is None:
        c.fail("cloudflareAccountId", "required: the Cloudflare account (32 hex characters) whose Workers publish "
                                      "the hosts' ACME challenges and serve MTA-STS and autoconfig")
    return Publishing(cloudflare_account_id=account or "", mta_sts_mode=mode, mta_sts_max_age=max_age_days * 86400,
                      tls_rpt_address=str(rpt_address), caa_iodef=iodef, autoconfig=autoconfig)


def _verify(c: _Checker, raw: Mapping[str, Any]) -> VerifyAfterDeploy:
    obj = _object(c, raw, "verify", ("afterDeploy", "failDeploy", "skipHost"))
    values = {}
    for key, default in (("afterDeploy", False), ("failDeploy", False), ("skipHost", True)):
        value = _as_bool(obj.get(key, default))
        if value is None:
            c.fail(f"verify.{key}", f"must be true or false, got {obj.get(key)!r}")
            value = default
        values[key] = value
    return VerifyAfterDeploy(enabled=values["afterDeploy"], fail_deploy=values["failDeploy"],
                             skip_host=values["skipHost"])


# Key generations are numbered from 1; one earlier generation may stay active while it retires (an IAM
# user has at most two access keys).
SES_KEY_GENERATION_MAX = 1000000


def _outbound(c: _Checker, raw: Mapping[str, Any], region: str) -> Outbound:
    """outbound: {relay: direct|ses, sesRegion?, sesKeyGeneration?, sesKeyRetiring?}."""
    obj = _object(c, raw, "outbound", OUTBOUND_KEYS)
    relay = obj.get("relay", "direct")
    if relay not in OUTBOUND_RELAYS:
        c.fail("outbound.relay", f"must be one of {', '.join(OUTBOUND_RELAYS)} (direct: the host sends on port 25 "
                                 f"itself; ses: through Amazon SES on 587), got {relay!r}")
        return Outbound()  # the other outbound.* keys are not checked against a relay that is not given
    if relay != "ses":
        # Nothing of SES is made with `direct`: a setting only `ses` reads would be silently ignored.
        for key in OUTBOUND_KEYS[1:]:
            if key in obj:
                c.fail(f"outbound.{key}", f"is valid only with outbound.relay: ses (relay is {relay}); remove it "
                                          "or set relay to ses")
        return Outbound(relay=str(relay))
    ses_region = obj.get("sesRegion", region)
    if not isinstance(ses_region, str) or not _REGION_RE.fullmatch(ses_region):
        c.fail("outbound.sesRegion", f"must be an AWS region where Amazon SES runs, like eu-central-1 (or unset for "
                                     f"the stack's region {region or '(orgmail:region)'}), got {ses_region!r}")
        ses_region = region
    generation = _int_setting(c, obj, "sesKeyGeneration", "outbound.sesKeyGeneration", 1, 1, SES_KEY_GENERATION_MAX)
    retiring: int | None = None
    if "sesKeyRetiring" in obj:
        retiring = _int_setting(c, obj, "sesKeyRetiring", "outbound.sesKeyRetiring", 0, 1, SES_KEY_GENERATION_MAX)
        if retiring == 0:
            retiring = None
        elif retiring == generation:
            c.fail("outbound.sesKeyRetiring", f"{retiring} is outbound.sesKeyGeneration, the key the host uses; "
                                              "give the previous generation (its key stays active until you remove "
                                              "sesKeyRetiring)")
            retiring = None
    return Outbound(relay="ses", ses_region=str(ses_region), ses_key_generation=generation, ses_key_retiring=retiring)


def _webmail(c: _Checker, raw: Mapping[str, Any], domains: tuple[Domain, ...], mail_host: str) -> Webmail | None:
    """webmail: {hostname?, requirePasswordChange?, access?: {identityProviderIds, emailDomains?, emails?,
    sessionDuration?}}; absent or false: no webmail."""
    value = raw.get("webmail")
    if value is None or _as_bool(value) is False:
        return None
    obj = {} if _as_bool(value) is True else _object(c, raw, "webmail", WEBMAIL_KEYS)
    default = f"webmail.{domains[0].name}" if domains else ""
    hostname = obj.get("hostname", default)
    if not _is_fqdn(hostname):
        c.fail("webmail.hostname", f"must be a host name like webmail.example.org (or unset for {default or 'webmail.<first domain>'}), "
                                   f"got {hostname!r}")
        hostname = default
    elif domains and zone_of(str(hostname), domains) is None:
        c.fail("webmail.hostname", f"{hostname} is outside every configured zone ({', '.join(d.name for d in domains)}); "
                                   "the tunnel's DNS record must lie in one of them")
    elif hostname == mail_host or hostname in {d.name for d in domains}:
        c.fail("webmail.hostname", f"{hostname} is the mail host or a mail domain; use its own name such as "
                                   f"{default or 'webmail.<domain>'}")
    require = _as_bool(obj.get("requirePasswordChange", True))
    if require is None:
        c.fail("webmail.requirePasswordChange", f"must be true or false, got {obj.get('requirePasswordChange')!r}")
        require = True
    access = _webmail_access(c, obj) if obj.get("access") is not None else None
    return Webmail(hostname=str(hostname), require_password_change=require, access=access)


def _webmail_access(c: _Checker, obj: Mapping[str, Any]) -> WebmailAccess | None:
    where = "webmail.access"
    value = obj["access"]
    if not isinstance(value, dict):
        c.fail(where, f"must be an object with keys {', '.join(WEBMAIL_ACCESS_KEYS)}")
        return None
    access = _read_as_meant(c, value, where, WEBMAIL_ACCESS_KEYS)
    lists: dict[str, tuple[str, ...]] = {}
    for key, pattern, like in (("identityProviderIds", _UUID_RE, "an Access identity provider id (a UUID such as "
                                                                 "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b)"),
                               ("emailDomains", _FQDN_RE, "a domain such as example.org"),
                               ("emails", re.compile(rf"{_LOCAL_PART_RE.pattern}@{_FQDN_RE.pattern}"),
                                "an address such as ann@example.org")):
        items = access.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            c.fail(f"{where}.{key}", f"must be a list, each {like}, got {items!r}")
            items = []
        for i, item in enumerate(items):
            if not pattern.fullmatch(item):
                c.fail(f"{where}.{key}[{i}]", f"must be {like}, got {item!r}")
        if len(set(items)) != len(items):
            c.fail(f"{where}.{key}", "lists an entry twice")
        lists[key] = tuple(items)
    if not lists["identityProviderIds"]:
        c.fail(f"{where}.identityProviderIds", "required: the ids of the account's Access identity providers (Zero "
                                               "Trust > Settings > Authentication) users log in with, e.g. Google, "
                                               "Microsoft or an OIDC provider")
    if not lists["emailDomains"] and not lists["emails"]:
        c.fail(where, "names nobody: give emailDomains, emails or both (who may reach webmail after the identity "
                      "provider)")
    duration = access.get("sessionDuration", "24h")
    if not isinstance(duration, str) or not _DURATION_RE.fullmatch(duration):
        c.fail(f"{where}.sessionDuration", f"must be minutes or hours like 30m or 24h, got {duration!r}")
        duration = "24h"
    return WebmailAccess(identity_provider_ids=lists["identityProviderIds"], email_domains=lists["emailDomains"],
                         emails=lists["emails"], session_duration=str(duration))


def _backup(c: _Checker, raw: Mapping[str, Any]) -> Backup:
    keys = ("keepDaily", "keepWeekly", "keepMonthly", "snapshotDays", "noncurrentDays", "alarmEmail")
    obj = _object(c, raw, "backup", keys)
    d = BACKUP_DEFAULTS
    alarm = _as_bool(obj.get("alarmEmail", d.alarm_email))
    if alarm is None:
        c.fail("backup.alarmEmail", f"must be true or false, got {obj.get('alarmEmail')!r}")
        alarm = d.alarm_email
    backup = Backup(
        keep_daily=_int_setting(c, obj, "keepDaily", "backup.keepDaily", d.keep_daily, 1, 365),
        keep_weekly=_int_setting(c, obj, "keepWeekly", "backup.keepWeekly", d.keep_weekly, 0, 520),
        keep_monthly=_int_setting(c, obj, "keepMonthly", "backup.keepMonthly", d.keep_monthly, 0, 240),
        # DLM keeps at most 1000 snapshots per schedule.
        snapshot_days=_int_setting(c, obj, "snapshotDays", "backup.snapshotDays", d.snapshot_days, 1, 1000),
        noncurrent_days=_int_setting(c, obj, "noncurrentDays", "backup.noncurrentDays", d.noncurrent_days, 1, 3650),
        alarm_email=alarm,
    )
    return backup


# orgmail:cluster (components/cluster.py): each key, the ClusterSizing field it sets, and its range.
# Instance types and classes are checked whole here; that AWS offers them is checked against botocore's
# EC2 model in the provider-constraint layer (tools/deploy_checks.py) and by the zone choice at deploy.
CLUSTER_INT_KEYS: dict[str, tuple[str, int, int]] = {
    "zones": ("zones", 2, 6),  # two zones at least: one zone's outage must leave mail running
    "shards": ("shards", 1, 100),
    "shardVolumeGb": ("shard_volume_gb", 50, 16384),  # the article's minimum disk; gp3's largest volume
    "edgesMin": ("edges_min", 2, 100),  # an edge stopped (scale-in, replacement) must leave another
    "edgesMax": ("edges_max", 2, 100),
    "edgesDesired": ("edges_desired", 2, 100),
    "relays": ("relays", 1, 8),  # each relay's address is an ip4: term of every domain's SPF record
    "directoryStorageGb": ("directory_storage_gb", 20, 65536),  # RDS for PostgreSQL, gp3
}
CLUSTER_TYPE_KEYS: dict[str, str] = {"shardInstanceType": "shard_instance_type", "edgeInstanceType": "edge_instance_type"}
CLUSTER_KEYS = (*CLUSTER_INT_KEYS, *CLUSTER_TYPE_KEYS, "directoryInstanceClass", "cacheNodeType")
_INSTANCE_TYPE_RE = re.compile(r"[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.[0-9]*[a-z0-9]+")  # m6i.large, c7gn.16xlarge
_DB_CLASS_RE = re.compile(r"db\.[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.[0-9]*[a-z0-9]+")  # db.m6i.large, db.r7g.2xlarge
_CACHE_NODE_RE = re.compile(r"cache\.[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.[0-9]*[a-z0-9]+")  # cache.m7g.large, cache.r7g.xlarge


def _cluster(c: _Checker, raw: Mapping[str, Any], tier: str) -> ClusterSizing | None:
    """orgmail:cluster: the ISP tier as a cluster, each size defaulting to the tier table's."""
    if "cluster" not in raw:
        return None
    defaults = TIERS[tier].cluster
    if defaults is None:
        with_cluster = ", ".join(t.name for t in TIERS.values() if t.cluster is not None)
        c.fail("cluster", f"only tier {with_cluster} runs as a cluster (tier is {tier}); remove orgmail:cluster "
                          f"or set orgmail:tier to {with_cluster}")
        return None
    obj = _object(c, raw, "cluster", CLUSTER_KEYS)
    values: dict[str, Any] = {}
    for key, (field_name, lo, hi) in CLUSTER_INT_KEYS.items():
        values[field_name] = _int_setting(c, obj, key, f"cluster.{key}", getattr(defaults, field_name), lo, hi)
    for key, field_name in CLUSTER_TYPE_KEYS.items():
        value = obj.get(key, getattr(defaults, field_name))
        if not isinstance(value, str) or not _INSTANCE_TYPE_RE.fullmatch(value):
            c.fail(f"cluster.{key}", f"must be an EC2 instance type like m6i.large, got {value!r}")
            value = getattr(defaults, field_name)
        values[field_name] = value
    db_class = obj.get("directoryInstanceClass", defaults.directory_instance_class)
    if not isinstance(db_class, str) or not _DB_CLASS_RE.fullmatch(db_class):
        c.fail("cluster.directoryInstanceClass", f"must be an RDS instance class like db.m6i.large, got {db_class!r}")
        db_class = defaults.directory_instance_class
    values["directory_instance_class"] = db_class
    node_type = obj.get("cacheNodeType", defaults.cache_node_type)
    if not isinstance(node_type, str) or not _CACHE_NODE_RE.fullmatch(node_type):
        c.fail("cluster.cacheNodeType", f"must be an ElastiCache node type like cache.m7g.large, got {node_type!r}")
        node_type = defaults.cache_node_type
    values["cache_node_type"] = node_type
    sizing = dataclasses.replace(defaults, **values)
    if sizing.edges_max < sizing.edges_min:
        c.fail("cluster.edgesMax", f"must be at least cluster.edgesMin ({sizing.edges_min}), got {sizing.edges_max}")
    elif not sizing.edges_min <= sizing.edges_desired <= sizing.edges_max:
        c.fail("cluster.edgesDesired", f"must lie from cluster.edgesMin ({sizing.edges_min}) to cluster.edgesMax "
                                       f"({sizing.edges_max}), got {sizing.edges_desired}")
    return sizing


def _cluster_refusals(c: _Checker, raw: Mapping[str, Any]) -> None:
    """What a cluster stack does not take: its users live in the directory (orgmail-users ...), never in
    Pulumi config, so that neither the plan nor the state grows with them; and its network is its own."""
    for key in ("mailboxes", "passwordHashes"):
        if raw.get(key):
            c.fail(key, "a cluster keeps its users in the directory (PostgreSQL), not in the stack config: "
                        "remove it and add them with `orgmail-users add` on a shard (docs/cluster.md); postmaster, abuse "
                        "and the report addresses need no entry (they are aliases of admin.email)")
    if "defaultQuota" in raw:
        c.fail("defaultQuota", "a cluster's quotas live in the directory: give each user one with `orgmail-users add "
                               f"--quota SIZE` (default {TIERS['isp'].default_quota}) or `orgmail-users quota ADDRESS "
                               "SIZE` (docs/cluster.md)")
    if raw.get("webmail") not in (None, False):
        c.fail("webmail", "webmail runs on the single mailbox host; a cluster has none yet (docs/cluster.md): remove "
                          "orgmail:webmail")
    if raw.get("network"):
        c.fail("network", "a cluster builds its own VPC over cluster.zones availability zones; remove "
                          "orgmail:network (an existing VPC is for the single-host tiers)")


def _cluster_aliases(c: _Checker, aliases: dict[str, tuple[str, ...]], domains: tuple[Domain, ...],
                     dmarc: Dmarc, publishing: Publishing) -> None:
    """A cluster's orgmail:aliases may name only the addresses of the organisation as a whole (postmaster@
    and abuse@ of each domain, the report addresses): a bounded list. Every other alias is the directory's."""
    allowed = {f"{role}@{d.name}" for d in domains for role in ROLE_ADDRESSES}
    allowed |= {dmarc.report_address, publishing.tls_rpt_address, *filter(None, [publishing.caa_iodef])}
    for alias in aliases:
        if alias not in allowed:
            c.fail(f"aliases.{alias}", "a cluster's orgmail:aliases holds only postmaster@ and abuse@ of each domain "
                                       "and the report addresses; add other aliases to the directory with "
                                       "`orgmail-users alias` (docs/cluster.md)")


_QUOTA_GIB = {"M": 1 / 1024, "G": 1, "T": 1024}  # Dovecot's sizes count in powers of 1024, like EBS's GiB


def quota_gib(quota: str) -> float:
    """A validated quota (500M, 2G, 1T) in GiB."""
    match = _QUOTA_RE.fullmatch(quota)
    assert match is not None, quota
    return int(match.group(1)) * _QUOTA_GIB[match.group(2)]


def settings_warnings(settings: Settings) -> list[str]:
    """Valid but risky: the tier serves fewer users than there are mailboxes, or the quotas add up to
    more than the tier's mail volume (the disk would fill before any quota stops it)."""
    tier = TIERS[settings.tier]
    warnings: list[str] = []
    count = len(settings.mailboxes)
    if tier.users_max is not None and count > tier.users_max:
        bigger = next((t.name for t in TIERS.values() if t.users_max is None or t.users_max >= count), None)
        warnings.append(f"{NAMESPACE}:mailboxes: {count} mailboxes, more than tier {tier.name} serves "
                        f"({tier.users_min}-{tier.users_max} users); set {NAMESPACE}:tier to {bigger}")
    quotas = sum(quota_gib(m.quota) for m in settings.mailboxes if m.quota)
    if quotas > tier.mail_volume_gb:
        bigger = next((t.name for t in TIERS.values() if t.mail_volume_gb >= quotas), None)
        fix = f"lower the quotas or set {NAMESPACE}:tier to {bigger}" if bigger else "lower the quotas"
        total = f"{quotas:.1f}".rstrip("0").rstrip(".")
        warnings.append(f"{NAMESPACE}:mailboxes: the quotas add up to {total} GB, more than tier {tier.name}'s "
                        f"{tier.mail_volume_gb} GB mail volume (which also holds the mail queue): the disk can fill "
                        f"before any quota stops a mailbox; {fix}")
    return warnings


def load_settings(raw: Mapping[str, Any], stack: str, project: str = DEFAULT_PROJECT) -> Settings:
    """Validate the `orgmail:` config of `stack` (of Pulumi project `project`); raise ConfigError listing
    every problem."""
    c = _Checker()
    _control_characters(c, raw, "")
    raw = _read_as_meant(c, _flat_dotted(c, raw), "", KNOWN_KEYS, "settings")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", stack):
        c.problems.append(f"stack name {stack!r}: must be lower-case letters, digits and '-', at most 40 characters "
                          "(it names the SSM path /orgmail/<stack> and the stack's Workers)")

    organization = raw.get("organization")
    if not isinstance(organization, str) or not _ORG_RE.fullmatch(organization):
        c.fail("organization", f"required: a name of 1-64 letters, digits, spaces or .,&'()-, got {organization!r}")
        organization = ""
    tier = raw.get("tier")
    if tier not in TIERS:
        c.fail("tier", f"must be one of {', '.join(TIERS)}, got {tier!r}")
        tier = "small"
    region = raw.get("region")
    if not isinstance(region, str) or not _REGION_RE.fullmatch(region):
        c.fail("region", f"required: an AWS region like eu-central-1, got {region!r}")
        region = ""

    before = len(c.problems)
    domains = _domains(c, raw)
    if len(c.problems) > before:
        # Membership errors against a broken domain list would only add noise.
        domains = ()
    mail_host = str(raw.get("mailHost"))
    if not _is_fqdn(raw.get("mailHost")):
        c.fail("mailHost", f"required: the mail host's name like mail.example.org, got {mail_host!r}"
                           f"{_idna_hint(mail_host)}")
        mail_host = ""
    elif domains and zone_of(mail_host, domains) is None:
        c.fail("mailHost", f"{mail_host} is outside every configured zone ({', '.join(d.name for d in domains)}); "
                           "it must lie in one of them so its A record can be published")
    elif domains and mail_host in {d.name for d in domains}:
        c.fail("mailHost", f"{mail_host} is a mail domain itself; use a host name inside it such as mail.{mail_host}")

    in_cluster = "cluster" in raw and raw.get("tier") in TIERS and TIERS[str(raw["tier"])].cluster is not None
    default_quota = _quota(c, raw.get("defaultQuota"), "defaultQuota", TIERS[str(tier)].default_quota)
    mailboxes = _mailboxes(c, raw, domains, default_quota)
    aliases = _aliases(c, raw, domains, mailboxes, directory=in_cluster)
    hashes = _password_hashes(c, raw, mailboxes)
    admin = _admin(c, raw)
    dmarc = _dmarc(c, raw, domains, admin.email)

    selector = raw.get("dkimSelector", "orgmail")
    if not isinstance(selector, str) or not _SELECTOR_RE.fullmatch(selector):
        c.fail("dkimSelector", f"must be a DNS label of lower-case letters, digits and '-', got {selector!r}")
        selector = "orgmail"
    retiring = _dkim_retiring(c, raw, selector)
    ttl = _int_setting(c, raw, "dnsTtl", "dnsTtl", 300, 60, 86400)

    ami = raw.get("amiId")
    if ami is not None and (not isinstance(ami, str) or not _AMI_RE.fullmatch(ami)):
        c.fail("amiId", f"must be an AMI id like ami-0123456789abcdef0 (or unset to look up Debian 13), got {ami!r}")
        ami = None
    network = _object(c, raw, "network", ("vpcId", "subnetId"))
    vpc_id, subnet_id = network.get("vpcId"), network.get("subnetId")
    if (vpc_id is None) != (subnet_id is None):
        c.fail("network", "give both vpcId and subnetId to use an existing network, or neither to create one")
    if vpc_id is not None and (not isinstance(vpc_id, str) or not _VPC_RE.fullmatch(vpc_id)):
        c.fail("network.vpcId", f"must be like vpc-0123456789abcdef0, got {vpc_id!r}")
    if subnet_id is not None and (not isinstance(subnet_id, str) or not _SUBNET_RE.fullmatch(subnet_id)):
        c.fail("network.subnetId", f"must be like subnet-0123456789abcdef0, got {subnet_id!r}")

    rate_limits = _rate_limits(c, raw)
    upgrades = _upgrades(c, raw)
    publishing = _publishing(c, raw, dmarc)
    verify = _verify(c, raw)
    backup = _backup(c, raw)
    outbound = _outbound(c, raw, region)
    dqs_key = raw.get("spamhausDqsKey")
    if dqs_key is not None and (not isinstance(dqs_key, str) or not _DQS_KEY_RE.fullmatch(dqs_key)):
        # Never echo the value: it is a secret.
        c.fail("spamhausDqsKey", "must be a Spamhaus DQS key: 26 lower-case letters and digits, set with "
               "`pulumi config set --secret orgmail:spamhausDqsKey <key>` (or unset to query the public zones)")
        dqs_key = None
    # A tier that is not valid was reported above: whether it takes a cluster is unknown.
    cluster = _cluster(c, raw, str(tier)) if raw.get("tier") in TIERS else None
    webmail = _webmail(c, raw, domains, mail_host)
    if cluster is not None:
        _cluster_refusals(c, raw)
        _cluster_aliases(c, aliases, domains, dmarc, publishing)
    if not c.problems:
        aliases = {**aliases, **_role_aliases(c, domains, mailboxes, aliases, admin, dmarc, publishing,
                                              cluster=cluster is not None)}

    if c.problems:
        raise ConfigError(c.problems)
    settings = Settings(
        stack=stack, organization=organization, tier=tier, region=region, mail_host=mail_host,
        domains=domains, mailboxes=mailboxes, aliases=aliases, password_hashes=hashes,
        dmarc=dmarc, admin=admin, dkim_selector=selector, dns_ttl=ttl, ami_id=ami,
        vpc_id=vpc_id, subnet_id=subnet_id, rate_limits=rate_limits, upgrades=upgrades,
        publishing=publishing, verify=verify, backup=backup, dkim_retiring=retiring,
        spamhaus_dqs_key=dqs_key, outbound=outbound, project=project, cluster=cluster, webmail=webmail,
    )
    # Names the records derive from these settings must fit DNS too; dns_records builds on Settings.
    from components.dns_records import name_problems
    from components.names import name_collisions

    too_long = name_problems(settings)
    if too_long:
        raise ConfigError(too_long)
    # Two resources (or DNS host names) from one name: refused before any resource is registered.
    collisions = name_collisions(settings)
    if collisions:
        raise ConfigError(collisions)
    from components.ses import ses_problems

    too_big = ses_problems(settings)
    if too_big:
        raise ConfigError(too_big)
    return settings
