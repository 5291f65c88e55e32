"""Provider constraints: every value the program sends to AWS and Cloudflare, checked against the
providers' own published limits, so that what the real API would refuse fails here.

The mock engine accepts any input. This module takes a mock run (tools.mockengine) and checks
each registered resource's inputs against:

* AWS: botocore's service models (length, pattern, enum, numeric and list ranges), reached
  through an explicit map from each Pulumi input to the API request member it becomes
  (`Api(service, operation, member)`); plus rules the models do not carry but AWS documents
  (`Doc`), each citing its source;
* Cloudflare: the pinned provider's argument documentation (pulumi_cloudflare docstrings) and
  Cloudflare's API documentation (`Doc`, each citing its source);
* names the provider makes up (Pulumi auto-naming, S3 bucket prefixes) at their final length.

`INPUTS` lists every (resource type, input path) the program sets. A type or an input without
an entry is itself a problem (`unmapped`), so a new input cannot slip past the check.
What only a real account can tell (quotas, zone entitlements, opt-in regions) is listed in
docs/deploy-checks.md.

    python -m tools.deploy_checks Pulumi.dev.yaml       # check one stack file's plan
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import botocore.session
import regex

from tools.mockengine import PLACEHOLDER_AMI, MockRun, Registered

# --- rule kinds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """The request member of an AWS API operation this input becomes (botocore's service model)."""

    service: str
    operation: str
    member: str  # dotted path inside the operation's input; "[]" list member, "{k}"/"{v}" map key/value


@dataclass(frozen=True)
class Doc:
    """A documented rule the API model does not carry: `check(value)` returns a problem or None."""

    check: Callable[[Any], str | None]
    source: str


@dataclass(frozen=True)
class Assigned:
    """The value is another resource's id/ARN or a provider default: nothing of ours to check."""

    why: str


@dataclass(frozen=True)
class Local:
    """Not sent to AWS or Cloudflare (a local provider such as random, tls or command)."""

    why: str


Rule = Api | Doc | Assigned | Local
Rules = Rule | tuple[Rule, ...]


@dataclass(frozen=True)
class Problem:
    type: str
    name: str
    path: str
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.type} {self.name!r} {self.path}: {self.message} [{self.source}]"


# --- botocore ---------------------------------------------------------------------------------


@functools.cache
def _service_model(service: str) -> Any:
    return botocore.session.get_session().get_service_model(service)


def api_shape(rule: Api) -> Any:
    """The botocore shape of `rule.member` (KeyError if the model has no such member)."""
    shape = _service_model(rule.service).operation_model(rule.operation).input_shape
    for part in rule.member.split("."):
        name = re.sub(r"(\[\]|\{k\}|\{v\})+$", "", part)
        shape = shape.members[name]
        for suffix in re.findall(r"\[\]|\{k\}|\{v\}", part[len(name):]):
            shape = {"[]": lambda s: s.member, "{k}": lambda s: s.key, "{v}": lambda s: s.value}[suffix](shape)
    return shape


def _java_pattern(pattern: str) -> regex.Pattern[str]:
    """botocore patterns are Java regular expressions; `regex` knows \\p{L} etc., not \\p{all}, and Java's
    UTF-16 surrogate-pair range (\\uD800\\uDC00-\\uDBFF\\uDFFF, Auto Scaling's XmlString) is the code points
    U+10000-U+10FFFF."""
    pattern = pattern.replace(r"\uD800\uDC00-\uDBFF\uDFFF", r"\U00010000-\U0010FFFF")
    return regex.compile(pattern.replace(r"\p{all}", r"\s\S"))


def _size_problems(md: dict[str, Any], size: int, unit: str, name: str) -> list[str]:
    problems = []
    if "min" in md and size < md["min"]:
        problems.append(f"{size} {unit}, {name} needs at least {md['min']}")
    if "max" in md and size > md["max"]:
        problems.append(f"{size} {unit}, {name} allows at most {md['max']}")
    return problems


def check_shape(shape: Any, value: Any) -> list[str]:
    """What the model says is wrong with `value` for `shape` (empty: nothing)."""
    md = shape.metadata
    kind = shape.type_name
    problems: list[str] = []
    if kind == "string":
        if not isinstance(value, str):
            return [f"must be a string for {shape.name}, got {value!r}"]
        problems += _size_problems(md, len(value), "characters", shape.name)
        if "pattern" in md and not _java_pattern(md["pattern"]).fullmatch(value):
            problems.append(f"{value!r} does not match {shape.name}'s pattern {md['pattern']}")
        if shape.enum and value not in shape.enum:
            problems.append(f"{value!r} is not one of {shape.name}: {', '.join(shape.enum)}")
    elif kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int | float) or float(value) != int(value):
            return [f"must be a whole number for {shape.name}, got {value!r}"]
        if "min" in md and value < md["min"]:
            problems.append(f"{value} is below {shape.name}'s minimum {md['min']}")
        if "max" in md and value > md["max"]:
            problems.append(f"{value} is above {shape.name}'s maximum {md['max']}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            problems.append(f"must be true or false for {shape.name}, got {value!r}")
    elif kind == "list":
        if not isinstance(value, list):
            return [f"must be a list for {shape.name}"]
        problems += _size_problems(md, len(value), "items", shape.name)
    elif kind == "double" and (isinstance(value, bool) or not isinstance(value, int | float)):
        problems.append(f"must be a number for {shape.name}, got {value!r}")
    return problems


# --- documented rules ---------------------------------------------------------------------------

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)


def _hostname_problem(value: Any, allow_underscore: bool = False) -> str | None:
    if not isinstance(value, str):
        return f"must be a host name, got {value!r}"
    if len(value) > 253:
        return f"{len(value)} characters; a DNS name has at most 253 (RFC 1035)"
    for label in value.rstrip(".").split("."):
        check = label[1:] if allow_underscore and label.startswith("_") else label
        if not _LABEL.fullmatch(check):
            return f"label {label!r} of {value!r} is not a DNS label of 1-63 letters, digits and '-' (RFC 1035)"
    return None


def hostname(value: Any) -> str | None:
    return _hostname_problem(value)


def record_name(value: Any) -> str | None:
    return _hostname_problem(value, allow_underscore=True)


def text(value: Any) -> str | None:
    """A required name the API documents no length for."""
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {value!r}"


def tunnel_secret(value: Any) -> str | None:
    import base64
    import binascii

    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        return "not base64"
    return None if len(raw) >= 32 else f"{len(raw)} bytes; at least 32"


def tunnel_ingress(value: Any) -> str | None:
    rules = value if isinstance(value, list) else []
    if not rules:
        return "no ingress rule"
    catch_all = [i for i, r in enumerate(rules) if not r.get("hostname") and not r.get("path")]
    return None if catch_all == [len(rules) - 1] else "the last rule, and only it, must match every name (no hostname)"


def go_duration(value: Any) -> str | None:
    ok = isinstance(value, str) and regex.fullmatch(r"(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+", value)
    return None if ok else f"{value!r} is not a duration like 300ms or 2h45m"


def length(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        return None if lo <= len(value) <= hi else f"{len(value)} characters; allowed {lo}-{hi}"
    return check


def byte_length(hi: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        size = len(str(value).encode())
        return None if size <= hi else f"{size} bytes; at most {hi} allowed"
    return check


def integer(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or float(value) != int(value):
            return f"must be a whole number, got {value!r}"
        return None if lo <= value <= hi else f"{int(value)} is outside {lo}-{hi}"
    return check


def one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"{value!r} is not one of {', '.join(map(str, allowed))}"
    return check


def matches(pattern: str, meaning: str) -> Callable[[Any], str | None]:
    compiled = regex.compile(pattern)

    def check(value: Any) -> str | None:
        if isinstance(value, str) and compiled.fullmatch(value):
            return None
        return f"{value!r} is not {meaning} (pattern {pattern})"
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def cidr(version: int, widest: int = 0, narrowest: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        try:
            net = ipaddress.ip_network(str(value), strict=True)
        except ValueError:
            return f"{value!r} is not an IPv{version} network with no host bits set"
        if net.version != version:
            return f"{value!r} is not an IPv{version} network"
        top = narrowest if narrowest is not None else net.max_prefixlen
        return None if widest <= net.prefixlen <= top else f"/{net.prefixlen} is outside /{widest}-/{top}"
    return check


def json_document(value: Any) -> str | None:
    try:
        json.loads(value)
    except (TypeError, ValueError) as e:
        return f"not a JSON document: {e}"
    return None


def iam_policy_size(limit: int) -> Callable[[Any], str | None]:
    """IAM counts policy characters without white space."""
    def check(value: Any) -> str | None:
        size = len(re.sub(r"\s", "", str(value)))
        return None if size <= limit else f"{size} characters without white space; IAM allows {limit}"
    return check


def deprecated(message: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value is None else message
    return check


def iso_date_not_future(value: Any) -> str | None:
    try:
        when = date.fromisoformat(str(value))
    except ValueError:
        return f"{value!r} is not a date YYYY-MM-DD"
    return None if when <= date.today() else f"{value} is in the future; the Workers runtime refuses it"


# Sources, cited beside each rule.
SRC_EC2_TAGS = "AWS tagging best practices / EC2 'Tag restrictions': key 1-128, value 0-256 Unicode characters, no aws: prefix, letters, numbers, spaces and _ . : / = + - @"
SRC_SG = "EC2 API CreateSecurityGroup / IpRange Description: up to 255 characters, a-z A-Z 0-9 spaces and ._-:/()#,@[]+=&;{}!$*"
SRC_GP3 = "Amazon EBS volume types, gp3: 1-16384 GiB, 3000-16000 IOPS at most 500 per GiB, 125-1000 MiB/s at most 0.25 MiB/s per IOPS"
SRC_USERDATA = "EC2 user guide, 'Run commands at launch': user data is limited to 16 KB in raw form, before base64"
SRC_IMDS = "EC2 API InstanceMetadataOptionsRequest HttpPutResponseHopLimit: 1-64"
SRC_VPC = "Amazon VPC user guide, 'VPC CIDR blocks': IPv4 blocks /16 to /28; subnets of IPv6 blocks are /64"
SRC_DEVICE = "EC2 user guide, 'Device names on Linux instances': EBS data volumes /dev/sd[f-p]"
SRC_S3_NAMES = "Amazon S3 'General purpose bucket naming rules': 3-63 characters of a-z 0-9 . -, begin and end with a letter or digit, no '..', not an IP address, no xn-- / sthree- / amzn-s3-demo- prefix, no -s3alias / --ol-s3 / .mrap / --x-s3 / --table-s3 suffix"
SRC_BUCKET_PREFIX = "pulumi-aws aws.s3.Bucket bucket_prefix: 'Must be lowercase and less than or equal to 37 characters in length' (the provider appends a 26-character unique suffix)"
SRC_S3_POLICY = "Amazon S3 quotas: a bucket policy is at most 20 KB"
SRC_S3_LIFECYCLE = "Amazon S3 LifecycleRule ID: up to 255 characters; days are positive whole numbers"
SRC_SSM_NAME = "AWS Systems Manager 'Parameter names': a-z A-Z 0-9 _ . - /, at most 1011 characters, at most 15 levels, no aws/ssm prefix"
SRC_SSM_VALUE = "AWS Systems Manager 'Parameter tiers': Standard values at most 4 KB (4096 characters); values may not be empty"
SRC_IAM_QUOTAS = "IAM and AWS STS quotas: inline role policies 10,240 characters in all, role trust policy 2,048 characters (white space excluded)"
SRC_ALARM_ACTIONS = "CloudWatch PutMetricAlarm AlarmActions: arn:aws:automate:<region>:ec2:recover|reboot|stop|terminate, or an SNS topic ARN"
SRC_SNS = "Amazon SNS CreateTopic Name: 1-256 characters of letters, digits, '-' and '_'; Subscribe Protocol: http, https, email, email-json, sms, sqs, application, lambda, firehose"
SRC_DLM = "Amazon Data Lifecycle Manager CreateRule: Interval 1, 2, 3, 4, 6, 8, 12 or 24 HOURS; RetainRule Count 1-1000"
SRC_AMI = "EC2 AMI ids: ami- and 8 or 17 hex digits; CopyImage Name: 3-128 characters of letters, digits, ( ) [ ] space . / - ' @ _"
SRC_CF_DNS = "pulumi_cloudflare.DnsRecord docs (name in Punycode; ttl 1 = automatic or 60-86400; type list; priority required for MX, SRV and URI)"
SRC_CF_TXT = "Cloudflare API (DNS records, TXT content): quoted character strings of up to 255 bytes each (RFC 1035); a record's wire format at most 4,096 bytes"
SRC_CF_COMMENT = "Cloudflare DNS 'Record attributes': comments up to 100 characters on Free, Pro and Business zones (500 on Enterprise)"
SRC_CF_DATA = "RFC 2782 (SRV priority, weight, port 0-65535) and RFC 8659 (CAA flags 0-255; tags issue, issuewild, iodef)"
SRC_CF_TOKEN = "Cloudflare API 'Create token': name up to 120 characters; policies effect allow|deny; resources as an object of resource keys"
SRC_CF_WORKER = "Cloudflare Workers: script names are lower-case letters, digits and '-' up to 63 characters (they become a workers.dev label); compatibility_date YYYY-MM-DD not in the future; script size at most 3 MB (Free) after compression"
SRC_CF_BINDING = "pulumi_cloudflare.WorkersScriptBindingArgs (name: a JavaScript variable name; type); Cloudflare Workers limits: an environment variable or secret is at most 5 KB"
SRC_CF_DOMAIN = "pulumi_cloudflare.WorkersCustomDomain docs: hostname is the zone apex or a subdomain; `environment` is deprecated ('This attribute is deprecated')"
SRC_CF_ID = "Cloudflare API: account, zone and permission-group identifiers are 32 hexadecimal characters"
SRC_CF_TUNNEL = ("pulumi_cloudflare.ZeroTrustTunnelCloudflared docs: name required (a user-friendly name); config_src "
                 "'local' or 'cloudflare'; tunnel_secret at least 32 bytes, encoded as base64")
SRC_CF_TUNNEL_CONFIG = ("pulumi_cloudflare.ZeroTrustTunnelCloudflaredConfig docs (at least one ingress rule; service a URL "
                        "or http_status:<code>) and cloudflared's ingress validation (ingress/ingress.go): the last rule "
                        "matches every name, and only the last")
SRC_CF_ACCESS_APP = ("pulumi_cloudflare.ZeroTrustAccessApplication docs: type one of self_hosted, saas, ...; destinations "
                     "type public or private; session_duration like 300ms or 2h45m (ns, us, ms, s, m, h); "
                     "auto_redirect_to_identity needs exactly one allowed_idps entry")
SRC_CF_ACCESS_POLICY = ("pulumi_cloudflare.ZeroTrustAccessPolicy docs: name required; decision allow, deny, non_identity or "
                        "bypass; includes such as email_domain.domain and email.email; session_duration as for applications")
SRC_CF_PROXIED = ("docs/design.md: mail records are never proxied (Cloudflare's proxy carries HTTP only); the one proxied "
                  "record is webmail's CNAME to its tunnel, <tunnel id>.cfargotunnel.com (Cloudflare Tunnel's DNS routing)")
SRC_REGIONS = "botocore's endpoint data (partitions): the regions AWS serves"
SRC_SES_NAMES = "Amazon SES API v2 CreateConfigurationSet / CreateConfigurationSetEventDestination: names of up to 64 characters: letters, digits, '-' and '_' only"
SRC_SES_TAGS = "Amazon SES API v2 Tag: key 1-128 characters, value 0-256 characters (as the EC2 tag restrictions)"
SRC_SES_EVENTS = "Amazon SES API v2 EventDestination MatchingEventTypes: SEND, REJECT, BOUNCE, COMPLAINT, DELIVERY, OPEN, CLICK, RENDERING_FAILURE, DELIVERY_DELAY, SUBSCRIPTION"
SRC_IAM_USER_POLICY = "IAM and AWS STS quotas: inline user policies 2,048 characters in all (white space excluded)"
SRC_SNS_POLICY = "Amazon SNS quotas: a topic's access policy is at most 30 KB"
SRC_ELB_NAMES = "Elastic Load Balancing CreateLoadBalancer / CreateTargetGroup Name: at most 32 characters, letters, digits and hyphens, not beginning or ending with a hyphen, not beginning with 'internal-'"
SRC_ELB_ATTRIBUTES = "Elastic Load Balancing target group attributes: deregistration_delay.timeout_seconds 0-3600, proxy_protocol_v2.enabled, preserve_client_ip.enabled and deregistration_delay.connection_termination.enabled true|false; load balancer attributes deletion_protection.enabled, load_balancing.cross_zone.enabled true|false"
SRC_ELB_STICKINESS = "Elastic Load Balancing target group attributes: stickiness.enabled true|false; stickiness.type lb_cookie or app_cookie (Application Load Balancers), source_ip (Network Load Balancers), source_ip_dest_ip or source_ip_dest_ip_proto (Gateway Load Balancers)"
SRC_NLB_HEALTH = "Network Load Balancer target group health checks: protocol TCP, HTTP or HTTPS; port 'traffic-port' or 1-65535; interval 5-300 seconds; healthy and unhealthy thresholds 2-10"
SRC_ASG = "Amazon EC2 Auto Scaling CreateAutoScalingGroup: HealthCheckType EC2, ELB, VPC_LATTICE or EBS; PutLifecycleHook: LifecycleTransition autoscaling:EC2_INSTANCE_LAUNCHING or autoscaling:EC2_INSTANCE_TERMINATING, HeartbeatTimeout 30-7200 seconds, DefaultResult CONTINUE or ABANDON"
SRC_RDS = "Amazon RDS CreateDBInstance (PostgreSQL): AllocatedStorage 20-65536 GiB on gp3; BackupRetentionPeriod 0-35 days; PreferredBackupWindow hh24:mi-hh24:mi (UTC, at least 30 minutes), PreferredMaintenanceWindow ddd:hh24:mi-ddd:hh24:mi (at least 30 minutes), not overlapping; Port 1150-65535; MasterUsername 1-63 letters, digits or '_', beginning with a letter, not a reserved word; DBName 1-63 letters, digits or '_', beginning with a letter; DBInstanceClass db.<class>.<size>; identifiers 1-63 (final snapshot 1-255) letters, digits and single hyphens, beginning with a letter, not ending with a hyphen"
SRC_RDS_SUBNETS = "Amazon RDS DB subnet groups: subnets in at least two Availability Zones of the region"
SRC_ELASTICACHE = "Amazon ElastiCache CreateReplicationGroup: ReplicationGroupId 1-40 letters, digits and single hyphens, beginning with a letter, not ending with a hyphen; Engine valkey or redis; CacheNodeType cache.<class>.<size>; NumCacheClusters 1-6, at least 2 with AutomaticFailoverEnabled, which MultiAZEnabled needs; AuthToken 16-128 printable ASCII characters without '/', '\"' or '@', only with TransitEncryptionEnabled; SnapshotRetentionLimit 0-35 days; SnapshotWindow hh24:mi-hh24:mi and PreferredMaintenanceWindow ddd:hh24:mi-ddd:hh24:mi (UTC), at least 60 minutes each, not overlapping; cache subnet group names up to 255 letters, digits or hyphens"
SRC_RDS_PARAMETERS = "Amazon RDS DB parameter groups: family <engine><major version> (postgres17); ApplyMethod immediate or pending-reboot; group names 1-255 letters, digits and hyphens, beginning with a letter"
SRC_LAUNCH_TEMPLATE = "EC2 CreateLaunchTemplate LaunchTemplateData: booleans of the pulumi-aws launch template (encrypted, delete_on_termination, associate_public_ip_address) are the strings 'true' or 'false'; device names /dev/xvda or /dev/sda1 for the root volume"


def ec2_tag_key(value: Any) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        return f"tag key {value!r} must be 1-128 characters"
    if value.lower().startswith("aws:"):
        return f"tag key {value!r} uses the reserved aws: prefix"
    return matches(r"[\p{L}\p{Z}\p{N}_.:/=+\-@]+", "a valid tag key")(value)


def ec2_tag_value(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 256:
        return f"tag value {value!r} must be at most 256 characters"
    return matches(r"[\p{L}\p{Z}\p{N}_.:/=+\-@]*", "a valid tag value")(value)


def sg_text(value: Any) -> str | None:
    return length(0, 255)(value) or matches(r"[a-zA-Z0-9. _\-:/()#,@\[\]+=&;{}!$*]*",
                                            "made of a-z A-Z 0-9 spaces and ._-:/()#,@[]+=&;{}!$*")(value)


def s3_bucket_name(name: str) -> str | None:
    if not 3 <= len(name) <= 63:
        return f"bucket name {name!r} is {len(name)} characters; allowed 3-63"
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", name) or ".." in name:
        return f"bucket name {name!r} must be a-z 0-9 . - beginning and ending with a letter or digit, no '..'"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        return f"bucket name {name!r} looks like an IP address"
    if name.startswith(("xn--", "sthree-", "amzn-s3-demo-")) or name.endswith(
            ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")):
        return f"bucket name {name!r} uses a reserved prefix or suffix"
    return None


BUCKET_SUFFIX = "2026120203000000000000001a"  # 26 characters, the shape of the provider's unique suffix


def bucket_prefix(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 37:
        return f"bucket_prefix {value!r} is {len(str(value))} characters; at most 37"
    return s3_bucket_name(value + BUCKET_SUFFIX[-26:].lower())


def ssm_name(value: Any) -> str | None:
    if not isinstance(value, str) or not re.fullmatch(r"/?[a-zA-Z0-9_.\-/]+", value):
        return f"{value!r} must be made of a-z A-Z 0-9 _ . - /"
    if len(value) > 1011:
        return f"{len(value)} characters; at most 1011"
    levels = value.strip("/").split("/")
    if len(levels) > 15:
        return f"{len(levels)} levels; at most 15"
    if levels[0].lower().startswith(("aws", "ssm")):
        return f"{value!r} begins with a reserved aws/ssm prefix"
    return None


def ssm_standard_value(value: Any) -> str | None:
    if not isinstance(value, str) or value == "":
        return "an empty value is refused"
    return None if len(value) <= 4096 else f"{len(value)} characters; a Standard parameter holds at most 4096"


def user_data_size(value: Any) -> str | None:
    raw = base64.b64decode(str(value))
    return None if len(raw) <= 16384 else f"{len(raw)} bytes raw; EC2 allows 16384"


def ami_id(value: Any) -> str | None:
    if value == PLACEHOLDER_AMI:
        return None
    return matches(r"ami-([0-9a-f]{8}|[0-9a-f]{17})", "an AMI id")(value)


def alarm_action(value: Any) -> str | None:
    return matches(r"arn:aws:automate:[a-z0-9-]+:ec2:(recover|reboot|stop|terminate)"
                   r"|arn:aws(-[a-z]+)*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}", "an EC2 action or SNS topic ARN")(value)


def txt_content(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be text, got {value!r}"
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', value)
    if not strings or re.sub(r'"((?:[^"\\]|\\.)*)"', "", value).strip():
        return f"TXT content must be quoted character strings, got {value[:40]!r}..."
    for s in strings:
        if len(s.encode()) > 255:
            return f"a TXT character string of {len(s.encode())} bytes; at most 255"
    return None if len(value.encode()) <= 4096 else f"{len(value.encode())} bytes; a record is at most 4096"


def elb_name(value: Any) -> str | None:
    if not isinstance(value, str) or not regex.fullmatch(r"(?!internal-)[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?", value):
        return f"{value!r} is not a load balancer or target group name (at most 32 letters, digits and inner hyphens)"
    return None


def rds_identifier(longest: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if (not isinstance(value, str) or len(value) > longest
                or not re.fullmatch(r"[A-Za-z](?:-?[A-Za-z0-9])*", value)):
            return (f"{value!r} is not an RDS identifier (1-{longest} letters, digits and single hyphens, beginning "
                    "with a letter, not ending with a hyphen)")
        return None
    return check


# PostgreSQL words RDS refuses as a master user name (RDS "Naming constraints").
RDS_RESERVED_USERS = ("postgres", "rdsadmin", "rds_superuser", "rdsrepladmin", "public", "admin", "all", "user")


def rds_master_username(value: Any) -> str | None:
    problem = matches(r"[A-Za-z][A-Za-z0-9_]{0,62}", "a master user name")(value)
    if problem is None and str(value).lower() in RDS_RESERVED_USERS:
        return f"{value!r} is a reserved word for the master user"
    return problem


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def rds_window(with_day: bool, shortest: int = 30, service: str = "RDS") -> Callable[[Any], str | None]:
    """A maintenance (ddd:hh24:mi-ddd:hh24:mi) or daily (hh24:mi-hh24:mi) window of at least `shortest` minutes."""
    day = r"(?:mon|tue|wed|thu|fri|sat|sun):" if with_day else ""
    pattern = rf"{day}(?:[01][0-9]|2[0-3]):[0-5][0-9]-{day}(?:[01][0-9]|2[0-3]):[0-5][0-9]"

    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            return f"{value!r} is not a window {'ddd:hh24:mi-ddd:hh24:mi' if with_day else 'hh24:mi-hh24:mi'} (UTC)"
        start, end = _window_minutes(value)
        length = (end - start) % (7 * 24 * 60 if with_day else 24 * 60)
        return None if length >= shortest else f"{value!r} is {length} minutes; {service} needs at least {shortest}"
    return check


def _window_minutes(value: str) -> tuple[int, int]:
    """A window's start and end, in minutes from Monday 00:00 (or from midnight for a daily window)."""
    ends = []
    for part in value.split("-"):
        if part.count(":") == 2:
            d, rest = part.split(":", 1)
            ends.append(_DAYS.index(d) * 24 * 60 + _minutes(rest))
        else:
            ends.append(_minutes(part))
    return ends[0], ends[1]


def windows_overlap(daily: Any, weekly: Any, shortest: int) -> bool:
    """Whether a daily window (hh24:mi-hh24:mi) meets a weekly one (ddd:hh24:mi-ddd:hh24:mi) on any day; False when
    either is not a valid window of at least `shortest` minutes (that is reported on its own)."""
    if not (isinstance(daily, str) and isinstance(weekly, str)) or rds_window(False, shortest)(daily) \
            or rds_window(True, shortest)(weekly):
        return False
    d_start, d_end = _window_minutes(daily)
    w_start, w_end = _window_minutes(weekly)
    week = 7 * 24 * 60
    for day in range(7):
        start, end = day * 1440 + d_start, day * 1440 + d_end + (1440 if d_end < d_start else 0)
        if max(start, w_start) < min(end, w_end + (week if w_end < w_start else 0)):
            return True
    return False


def launch_template_bool(value: Any) -> str | None:
    return None if value in ("true", "false") else f"{value!r}: pulumi-aws takes the strings 'true' or 'false' here"


def cf_id(value: Any) -> str | None:
    return matches(r"[0-9a-f]{32}", "a 32-hex Cloudflare id")(value)


@functools.cache
def aws_regions() -> frozenset[str]:
    s = botocore.session.get_session()
    return frozenset(r for p in s.get_available_partitions() for r in s.get_available_regions("ec2", p))


def aws_region(value: Any) -> str | None:
    return None if value in aws_regions() else f"{value!r} is not an AWS region botocore knows"


def token_resources(value: Any) -> str | None:
    try:
        resources = json.loads(value)
    except (TypeError, ValueError):
        return "must be a JSON object of resource keys"
    bad = [k for k in resources if not re.fullmatch(r"com\.cloudflare\.api\.account(\.zone)?\.([0-9a-f]{32}|\*)", k)]
    return f"unknown resource keys {bad}" if bad else None


# --- the map: every input the program sets ------------------------------------------------------

ID = Assigned("another resource's id, ARN or name, made by the provider")
TAGS: dict[str, Rules] = {"tags{k}": Doc(ec2_tag_key, SRC_EC2_TAGS), "tags{v}": Doc(ec2_tag_value, SRC_EC2_TAGS)}
GP3_SOURCES = Doc(integer(1, 16384), SRC_GP3)

INPUTS: dict[str, dict[str, Rules]] = {
    "pulumi:providers:aws": {
        "region": Doc(aws_region, SRC_REGIONS),
        "skipCredentialsValidation": Local("provider setting, not sent to AWS"),
        "skipRegionValidation": Local("provider setting, not sent to AWS"),
    },
    # Network
    "aws:ec2/vpc:Vpc": {
        "cidrBlock": Doc(cidr(4, 16, 28), SRC_VPC),
        "assignGeneratedIpv6CidrBlock": Api("ec2", "CreateVpc", "AmazonProvidedIpv6CidrBlock"),
        "enableDnsSupport": Doc(boolean, "EC2 ModifyVpcAttribute EnableDnsSupport"),
        "enableDnsHostnames": Doc(boolean, "EC2 ModifyVpcAttribute EnableDnsHostnames"),
        **TAGS,
    },
    "aws:ec2/internetGateway:InternetGateway": {"vpcId": ID, **TAGS},
    "aws:ec2/subnet:Subnet": {
        "vpcId": ID,
        "cidrBlock": Doc(cidr(4, 16, 28), SRC_VPC),
        "ipv6CidrBlock": Doc(cidr(6, 64, 64), SRC_VPC),
        "availabilityZone": Api("ec2", "CreateSubnet", "AvailabilityZone"),
        "assignIpv6AddressOnCreation": Doc(boolean, "EC2 ModifySubnetAttribute"),
        "mapPublicIpOnLaunch": Doc(boolean, "EC2 ModifySubnetAttribute"),
        **TAGS,
    },
    "aws:ec2/routeTable:RouteTable": {
        "vpcId": ID,
        "routes[].cidrBlock": Doc(cidr(4), "EC2 CreateRoute DestinationCidrBlock"),
        "routes[].ipv6CidrBlock": Doc(cidr(6), "EC2 CreateRoute DestinationIpv6CidrBlock"),
        "routes[].gatewayId": ID,
        **TAGS,
    },
    "aws:ec2/routeTableAssociation:RouteTableAssociation": {"subnetId": ID, "routeTableId": ID},
    "aws:ec2/networkInterface:NetworkInterface": {
        "subnetId": ID, "securityGroups[]": ID,
        "description": (Api("ec2", "CreateNetworkInterface", "Description"), Doc(length(0, 255), "EC2 CreateNetworkInterface Description: up to 255 characters")),
        "sourceDestCheck": Doc(boolean, "EC2 ModifyNetworkInterfaceAttribute SourceDestCheck"),
        **TAGS,
    },
    # Firewall
    "aws:ec2/securityGroup:SecurityGroup": {
        "vpcId": ID,
        "description": Doc(sg_text, SRC_SG),
        **TAGS,
    },
    **{t: {
        "securityGroupId": ID,
        "ipProtocol": Doc(one_of("tcp", "udp", "icmp", "icmpv6", "-1"), "EC2 IpPermission IpProtocol (lower-case names or -1)"),
        "fromPort": Doc(integer(-1, 65535), "EC2 IpPermission FromPort: 0-65535, or an ICMP type, -1 for all"),
        "toPort": Doc(integer(-1, 65535), "EC2 IpPermission ToPort: 0-65535, or an ICMP code, -1 for all"),
        "cidrIpv4": Doc(cidr(4), "EC2 IpRange CidrIp"),
        "cidrIpv6": Doc(cidr(6), "EC2 Ipv6Range CidrIpv6"),
        "referencedSecurityGroupId": ID,
        "description": Doc(sg_text, SRC_SG),
    } for t in ("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
                "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")},
    # Hosts
    "aws:ec2/amiCopy:AmiCopy": {
        "name": (Api("ec2", "CopyImage", "Name"), Doc(matches(r"[A-Za-z0-9()\[\] ./\-'@_]{3,128}", "a valid AMI name"), SRC_AMI)),
        "description": Api("ec2", "CopyImage", "Description"),
        "sourceAmiId": Doc(ami_id, SRC_AMI),
        "sourceAmiRegion": Doc(aws_region, SRC_REGIONS),
        "encrypted": Api("ec2", "CopyImage", "Encrypted"),
        **TAGS,
    },
    "aws:ec2/instance:Instance": {
        "ami": Doc(ami_id, SRC_AMI),
        "instanceType": Api("ec2", "RunInstances", "InstanceType"),
        "iamInstanceProfile": ID,
        "userDataBase64": Doc(user_data_size, SRC_USERDATA),
        "userDataReplaceOnChange": Local("provider behaviour, not sent to AWS"),
        "primaryNetworkInterface.networkInterfaceId": ID,
        "primaryNetworkInterface.deleteOnTermination": Doc(boolean, "EC2 InstanceNetworkInterfaceSpecification DeleteOnTermination"),
        "metadataOptions.httpEndpoint": Api("ec2", "RunInstances", "MetadataOptions.HttpEndpoint"),
        "metadataOptions.httpTokens": Api("ec2", "RunInstances", "MetadataOptions.HttpTokens"),
        "metadataOptions.httpPutResponseHopLimit": Doc(integer(1, 64), SRC_IMDS),
        "metadataOptions.instanceMetadataTags": Api("ec2", "RunInstances", "MetadataOptions.InstanceMetadataTags"),
        "rootBlockDevice.volumeType": Api("ec2", "RunInstances", "BlockDeviceMappings[].Ebs.VolumeType"),
        "rootBlockDevice.volumeSize": GP3_SOURCES,
        "rootBlockDevice.encrypted": Api("ec2", "RunInstances", "BlockDeviceMappings[].Ebs.Encrypted"),
        "rootBlockDevice.deleteOnTermination": Api("ec2", "RunInstances", "BlockDeviceMappings[].Ebs.DeleteOnTermination"),
        "creditSpecification.cpuCredits": Doc(one_of("standard", "unlimited"), "EC2 CreditSpecificationRequest CpuCredits"),
        **TAGS,
    },
    "aws:ebs/volume:Volume": {
        "availabilityZone": Api("ec2", "CreateVolume", "AvailabilityZone"),
        "type": Api("ec2", "CreateVolume", "VolumeType"),
        "size": GP3_SOURCES,
        "iops": Doc(integer(3000, 16000), SRC_GP3),
        "throughput": Doc(integer(125, 1000), SRC_GP3),
        "encrypted": Api("ec2", "CreateVolume", "Encrypted"),
        "finalSnapshot": Local("provider behaviour: snapshot before delete"),
        **TAGS,
    },
    "aws:ec2/volumeAttachment:VolumeAttachment": {
        "deviceName": Doc(matches(r"/dev/sd[f-p]", "a data-volume device name"), SRC_DEVICE),
        "volumeId": ID, "instanceId": ID,
        "stopInstanceBeforeDetaching": Local("provider behaviour"),
    },
    "aws:ec2/eip:Eip": {"domain": Api("ec2", "AllocateAddress", "Domain"), **TAGS},
    "aws:ec2/eipAssociation:EipAssociation": {"allocationId": ID, "networkInterfaceId": ID, "instanceId": ID},
    "aws:ec2/eipDomainName:EipDomainName": {"allocationId": ID, "domainName": Doc(hostname, "EC2 ModifyAddressAttribute DomainName: a DNS name (RFC 1035)")},
    # Secrets and roles
    "aws:ssm/parameter:Parameter": {
        "name": (Api("ssm", "PutParameter", "Name"), Doc(ssm_name, SRC_SSM_NAME)),
        "type": Api("ssm", "PutParameter", "Type"),
        "tier": Api("ssm", "PutParameter", "Tier"),
        "value": Doc(ssm_standard_value, SRC_SSM_VALUE),
        "description": Api("ssm", "PutParameter", "Description"),
        "tags{k}": Api("ssm", "PutParameter", "Tags[].Key"),
        "tags{v}": Api("ssm", "PutParameter", "Tags[].Value"),
    },
    "aws:iam/role:Role": {
        "assumeRolePolicy": (Api("iam", "CreateRole", "AssumeRolePolicyDocument"), Doc(json_document, "IAM policy grammar"),
                             Doc(iam_policy_size(2048), SRC_IAM_QUOTAS)),
        "description": Api("iam", "CreateRole", "Description"),
        "path": Api("iam", "CreateRole", "Path"),
        "permissionsBoundary": Api("iam", "CreateRole", "PermissionsBoundary"),
        "tags{k}": Api("iam", "CreateRole", "Tags[].Key"),
        "tags{v}": Api("iam", "CreateRole", "Tags[].Value"),
    },
    "aws:iam/rolePolicy:RolePolicy": {
        "role": ID,
        "policy": (Api("iam", "PutRolePolicy", "PolicyDocument"), Doc(json_document, "IAM policy grammar"),
                   Doc(iam_policy_size(10240), SRC_IAM_QUOTAS)),
    },
    # The SES relay's SMTP user (outbound.relay: ses)
    "aws:iam/user:User": {
        "path": Api("iam", "CreateUser", "Path"),
        "permissionsBoundary": Api("iam", "CreateUser", "PermissionsBoundary"),
        "tags{k}": Api("iam", "CreateUser", "Tags[].Key"),
        "tags{v}": Api("iam", "CreateUser", "Tags[].Value"),
    },
    "aws:iam/userPolicy:UserPolicy": {
        "user": ID,
        "policy": (Api("iam", "PutUserPolicy", "PolicyDocument"), Doc(json_document, "IAM policy grammar"),
                   Doc(iam_policy_size(2048), SRC_IAM_USER_POLICY)),
    },
    "aws:iam/accessKey:AccessKey": {"user": ID},
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": {"role": ID, "policyArn": Api("iam", "AttachRolePolicy", "PolicyArn")},
    "aws:iam/instanceProfile:InstanceProfile": {
        "role": ID,
        "tags{k}": Api("iam", "CreateInstanceProfile", "Tags[].Key"),
        "tags{v}": Api("iam", "CreateInstanceProfile", "Tags[].Value"),
    },
    # Backups
    "aws:s3/bucket:Bucket": {
        "bucketPrefix": Doc(bucket_prefix, f"{SRC_BUCKET_PREFIX}; {SRC_S3_NAMES}"),
        "tags{k}": (Api("s3", "PutBucketTagging", "Tagging.TagSet[].Key"), Doc(ec2_tag_key, SRC_EC2_TAGS)),
        "tags{v}": (Api("s3", "PutBucketTagging", "Tagging.TagSet[].Value"), Doc(ec2_tag_value, SRC_EC2_TAGS)),
    },
    "aws:s3/bucketOwnershipControls:BucketOwnershipControls": {
        "bucket": ID, "rule.objectOwnership": Api("s3", "PutBucketOwnershipControls", "OwnershipControls.Rules[].ObjectOwnership")},
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock": {
        "bucket": ID,
        **{k: Api("s3", "PutPublicAccessBlock", f"PublicAccessBlockConfiguration.{k[0].upper()}{k[1:]}")
           for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")},
    },
    "aws:s3/bucketVersioning:BucketVersioning": {
        "bucket": ID, "versioningConfiguration.status": Api("s3", "PutBucketVersioning", "VersioningConfiguration.Status")},
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration": {
        "bucket": ID,
        "rules[].applyServerSideEncryptionByDefault.sseAlgorithm": Api(
            "s3", "PutBucketEncryption", "ServerSideEncryptionConfiguration.Rules[].ApplyServerSideEncryptionByDefault.SSEAlgorithm"),
        "rules[].bucketKeyEnabled": Api("s3", "PutBucketEncryption", "ServerSideEncryptionConfiguration.Rules[].BucketKeyEnabled"),
    },
    "aws:s3/bucketPolicy:BucketPolicy": {
        "bucket": ID, "policy": (Doc(json_document, "IAM policy grammar"), Doc(byte_length(20480), SRC_S3_POLICY))},
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration": {
        "bucket": ID,
        "rules[].id": Doc(length(1, 255), SRC_S3_LIFECYCLE),
        "rules[].status": Api("s3", "PutBucketLifecycleConfiguration", "LifecycleConfiguration.Rules[].Status"),
        "rules[].noncurrentVersionExpiration.noncurrentDays": Doc(integer(1, 2147483647), SRC_S3_LIFECYCLE),
        "rules[].abortIncompleteMultipartUpload.daysAfterInitiation": Doc(integer(1, 2147483647), SRC_S3_LIFECYCLE),
    },
    "aws:dlm/lifecyclePolicy:LifecyclePolicy": {
        "description": Api("dlm", "CreateLifecyclePolicy", "Description"),
        "executionRoleArn": Assigned("the DLM role's ARN"),
        "state": Api("dlm", "CreateLifecyclePolicy", "State"),
        "policyDetails.resourceTypes[]": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.ResourceTypes[]"),
        "policyDetails.targetTags{k}": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.TargetTags[].Key"),
        "policyDetails.targetTags{v}": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.TargetTags[].Value"),
        "policyDetails.schedules[].name": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].Name"),
        "policyDetails.schedules[].copyTags": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].CopyTags"),
        "policyDetails.schedules[].createRule.interval": Doc(one_of(1, 2, 3, 4, 6, 8, 12, 24), SRC_DLM),
        "policyDetails.schedules[].createRule.intervalUnit": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].CreateRule.IntervalUnit"),
        "policyDetails.schedules[].createRule.times": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].CreateRule.Times[]"),
        "policyDetails.schedules[].retainRule.count": (Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].RetainRule.Count"),
                                                       Doc(integer(1, 1000), SRC_DLM)),
        "policyDetails.schedules[].tagsToAdd{k}": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].TagsToAdd[].Key"),
        "policyDetails.schedules[].tagsToAdd{v}": Api("dlm", "CreateLifecyclePolicy", "PolicyDetails.Schedules[].TagsToAdd[].Value"),
        "tags{k}": Api("dlm", "CreateLifecyclePolicy", "Tags{k}"),
        "tags{v}": Api("dlm", "CreateLifecyclePolicy", "Tags{v}"),
    },
    "aws:cloudwatch/metricAlarm:MetricAlarm": {
        "namespace": Api("cloudwatch", "PutMetricAlarm", "Namespace"),
        "metricName": Api("cloudwatch", "PutMetricAlarm", "MetricName"),
        "dimensions{k}": Api("cloudwatch", "PutMetricAlarm", "Dimensions[].Name"),
        "dimensions{v}": Api("cloudwatch", "PutMetricAlarm", "Dimensions[].Value"),
        "statistic": Api("cloudwatch", "PutMetricAlarm", "Statistic"),
        "period": (Api("cloudwatch", "PutMetricAlarm", "Period"),
                   Doc(one_of(10, 20, 30, *range(60, 86400 * 7 + 1, 60)), "CloudWatch Period: 10, 20, 30 or a multiple of 60 seconds")),
        "evaluationPeriods": Api("cloudwatch", "PutMetricAlarm", "EvaluationPeriods"),
        "comparisonOperator": Api("cloudwatch", "PutMetricAlarm", "ComparisonOperator"),
        "threshold": Api("cloudwatch", "PutMetricAlarm", "Threshold"),
        "treatMissingData": Doc(one_of("breaching", "notBreaching", "ignore", "missing"), "CloudWatch TreatMissingData"),
        "alarmDescription": Api("cloudwatch", "PutMetricAlarm", "AlarmDescription"),
        "alarmActions": Api("cloudwatch", "PutMetricAlarm", "AlarmActions"),
        "alarmActions[]": (Api("cloudwatch", "PutMetricAlarm", "AlarmActions[]"), Doc(alarm_action, SRC_ALARM_ACTIONS)),
        "okActions": Api("cloudwatch", "PutMetricAlarm", "OKActions"),
        "okActions[]": (Api("cloudwatch", "PutMetricAlarm", "OKActions[]"), Doc(alarm_action, SRC_ALARM_ACTIONS)),
        "tags{k}": Api("cloudwatch", "PutMetricAlarm", "Tags[].Key"),
        "tags{v}": Api("cloudwatch", "PutMetricAlarm", "Tags[].Value"),
    },
    "aws:sns/topic:Topic": {
        "tags{k}": Api("sns", "CreateTopic", "Tags[].Key"),
        "tags{v}": Api("sns", "CreateTopic", "Tags[].Value"),
    },
    "aws:sns/topicSubscription:TopicSubscription": {
        "topic": ID,
        "protocol": Doc(one_of("http", "https", "email", "email-json", "sms", "sqs", "application", "lambda", "firehose"), SRC_SNS),
        "endpoint": Doc(matches(r"[^@\s]+@[^@\s]+\.[^@\s]+", "an e-mail address"), SRC_SNS),
    },
    "aws:sns/topicPolicy:TopicPolicy": {
        "arn": ID,
        "policy": (Doc(json_document, "IAM policy grammar"), Doc(byte_length(30 * 1024), SRC_SNS_POLICY)),
    },
    # Amazon SES (outbound.relay: ses)
    "aws:sesv2/configurationSet:ConfigurationSet": {
        "configurationSetName": (Api("sesv2", "CreateConfigurationSet", "ConfigurationSetName"),
                                 Doc(matches(r"[A-Za-z0-9_-]{1,64}", "an SES configuration set name"), SRC_SES_NAMES)),
        "reputationOptions.reputationMetricsEnabled": Api(
            "sesv2", "CreateConfigurationSet", "ReputationOptions.ReputationMetricsEnabled"),
        "sendingOptions.sendingEnabled": Api("sesv2", "CreateConfigurationSet", "SendingOptions.SendingEnabled"),
        "tags{k}": (Api("sesv2", "CreateConfigurationSet", "Tags[].Key"), Doc(length(1, 128), SRC_SES_TAGS)),
        "tags{v}": (Api("sesv2", "CreateConfigurationSet", "Tags[].Value"), Doc(length(0, 256), SRC_SES_TAGS)),
    },
    "aws:sesv2/configurationSetEventDestination:ConfigurationSetEventDestination": {
        "configurationSetName": Api("sesv2", "CreateConfigurationSetEventDestination", "ConfigurationSetName"),
        "eventDestinationName": (Api("sesv2", "CreateConfigurationSetEventDestination", "EventDestinationName"),
                                 Doc(matches(r"[A-Za-z0-9_-]{1,64}", "an SES event destination name"), SRC_SES_NAMES)),
        "eventDestination.enabled": Api("sesv2", "CreateConfigurationSetEventDestination", "EventDestination.Enabled"),
        "eventDestination.matchingEventTypes": Api(
            "sesv2", "CreateConfigurationSetEventDestination", "EventDestination.MatchingEventTypes"),
        "eventDestination.matchingEventTypes[]": (
            Api("sesv2", "CreateConfigurationSetEventDestination", "EventDestination.MatchingEventTypes[]"),
            Doc(one_of("SEND", "REJECT", "BOUNCE", "COMPLAINT", "DELIVERY", "OPEN", "CLICK", "RENDERING_FAILURE",
                       "DELIVERY_DELAY", "SUBSCRIPTION"), SRC_SES_EVENTS)),
        "eventDestination.snsDestination.topicArn": Api(
            "sesv2", "CreateConfigurationSetEventDestination", "EventDestination.SnsDestination.TopicArn"),
    },
    "aws:sesv2/emailIdentity:EmailIdentity": {
        "emailIdentity": (Api("sesv2", "CreateEmailIdentity", "EmailIdentity"), Doc(hostname, "SES domain identity: a domain name")),
        "configurationSetName": Api("sesv2", "CreateEmailIdentity", "ConfigurationSetName"),
        "dkimSigningAttributes.domainSigningPrivateKey": Api(
            "sesv2", "CreateEmailIdentity", "DkimSigningAttributes.DomainSigningPrivateKey"),
        "dkimSigningAttributes.domainSigningSelector": Api(
            "sesv2", "CreateEmailIdentity", "DkimSigningAttributes.DomainSigningSelector"),
        "tags{k}": (Api("sesv2", "CreateEmailIdentity", "Tags[].Key"), Doc(length(1, 128), SRC_SES_TAGS)),
        "tags{v}": (Api("sesv2", "CreateEmailIdentity", "Tags[].Value"), Doc(length(0, 256), SRC_SES_TAGS)),
    },
    "aws:sesv2/emailIdentityMailFromAttributes:EmailIdentityMailFromAttributes": {
        "emailIdentity": Api("sesv2", "PutEmailIdentityMailFromAttributes", "EmailIdentity"),
        "mailFromDomain": (Api("sesv2", "PutEmailIdentityMailFromAttributes", "MailFromDomain"),
                           Doc(hostname, "SES custom MAIL FROM domain: a subdomain of the identity")),
        "behaviorOnMxFailure": Api("sesv2", "PutEmailIdentityMailFromAttributes", "BehaviorOnMxFailure"),
    },
    # The ISP cluster (orgmail:cluster): load balancer, edges, directory
    "aws:lb/loadBalancer:LoadBalancer": {
        "loadBalancerType": Api("elbv2", "CreateLoadBalancer", "Type"),
        "internal": Doc(boolean, "ELB CreateLoadBalancer Scheme: internet-facing unless internal"),
        "ipAddressType": Api("elbv2", "CreateLoadBalancer", "IpAddressType"),
        "securityGroups": Api("elbv2", "CreateLoadBalancer", "SecurityGroups"),
        "securityGroups[]": ID,
        "subnetMappings": Api("elbv2", "CreateLoadBalancer", "SubnetMappings"),
        "subnetMappings[].subnetId": ID,
        "subnetMappings[].allocationId": ID,
        "enableDeletionProtection": Doc(boolean, SRC_ELB_ATTRIBUTES),
        "enableCrossZoneLoadBalancing": Doc(boolean, SRC_ELB_ATTRIBUTES),
        "tags{k}": Api("elbv2", "CreateLoadBalancer", "Tags[].Key"),
        "tags{v}": Api("elbv2", "CreateLoadBalancer", "Tags[].Value"),
    },
    "aws:lb/targetGroup:TargetGroup": {
        "port": Api("elbv2", "CreateTargetGroup", "Port"),
        "protocol": Api("elbv2", "CreateTargetGroup", "Protocol"),
        "targetType": Api("elbv2", "CreateTargetGroup", "TargetType"),
        "vpcId": ID,
        "proxyProtocolV2": Doc(boolean, SRC_ELB_ATTRIBUTES),
        "preserveClientIp": Doc(one_of("true", "false"), SRC_ELB_ATTRIBUTES),
        "connectionTermination": Doc(boolean, SRC_ELB_ATTRIBUTES),
        "deregistrationDelay": Doc(integer(0, 3600), SRC_ELB_ATTRIBUTES),
        "stickiness.enabled": Doc(boolean, SRC_ELB_STICKINESS),
        # Every target group here is a Network Load Balancer's: source_ip is the one type it takes.
        "stickiness.type": Doc(one_of("source_ip"), SRC_ELB_STICKINESS),
        "healthCheck.enabled": Api("elbv2", "CreateTargetGroup", "HealthCheckEnabled"),
        "healthCheck.protocol": (Api("elbv2", "CreateTargetGroup", "HealthCheckProtocol"),
                                 Doc(one_of("TCP", "HTTP", "HTTPS"), SRC_NLB_HEALTH)),
        "healthCheck.port": (Api("elbv2", "CreateTargetGroup", "HealthCheckPort"),
                             Doc(lambda v: None if v == "traffic-port" else integer(1, 65535)(int(v) if str(v).isdigit() else v),
                                 SRC_NLB_HEALTH)),
        "healthCheck.interval": (Api("elbv2", "CreateTargetGroup", "HealthCheckIntervalSeconds"),
                                 Doc(integer(5, 300), SRC_NLB_HEALTH)),
        "healthCheck.healthyThreshold": (Api("elbv2", "CreateTargetGroup", "HealthyThresholdCount"),
                                         Doc(integer(2, 10), SRC_NLB_HEALTH)),
        "healthCheck.unhealthyThreshold": (Api("elbv2", "CreateTargetGroup", "UnhealthyThresholdCount"),
                                           Doc(integer(2, 10), SRC_NLB_HEALTH)),
        "tags{k}": Api("elbv2", "CreateTargetGroup", "Tags[].Key"),
        "tags{v}": Api("elbv2", "CreateTargetGroup", "Tags[].Value"),
    },
    "aws:lb/listener:Listener": {
        "loadBalancerArn": ID,
        "port": Api("elbv2", "CreateListener", "Port"),
        "protocol": Api("elbv2", "CreateListener", "Protocol"),
        "defaultActions[].type": Api("elbv2", "CreateListener", "DefaultActions[].Type"),
        "defaultActions[].targetGroupArn": ID,
        "tags{k}": Api("elbv2", "CreateListener", "Tags[].Key"),
        "tags{v}": Api("elbv2", "CreateListener", "Tags[].Value"),
    },
    "aws:ec2/launchTemplate:LaunchTemplate": {
        "description": Api("ec2", "CreateLaunchTemplate", "VersionDescription"),
        "imageId": Doc(ami_id, SRC_AMI),
        "instanceType": Api("ec2", "CreateLaunchTemplate", "LaunchTemplateData.InstanceType"),
        "iamInstanceProfile.name": ID,
        "userData": Doc(user_data_size, SRC_USERDATA),
        "metadataOptions.httpEndpoint": Api("ec2", "CreateLaunchTemplate", "LaunchTemplateData.MetadataOptions.HttpEndpoint"),
        "metadataOptions.httpTokens": Api("ec2", "CreateLaunchTemplate", "LaunchTemplateData.MetadataOptions.HttpTokens"),
        "metadataOptions.httpPutResponseHopLimit": Doc(integer(1, 64), SRC_IMDS),
        "metadataOptions.instanceMetadataTags": Api(
            "ec2", "CreateLaunchTemplate", "LaunchTemplateData.MetadataOptions.InstanceMetadataTags"),
        "blockDeviceMappings[].deviceName": Doc(one_of("/dev/xvda", "/dev/sda1"), SRC_LAUNCH_TEMPLATE),
        "blockDeviceMappings[].ebs.volumeType": Api(
            "ec2", "CreateLaunchTemplate", "LaunchTemplateData.BlockDeviceMappings[].Ebs.VolumeType"),
        "blockDeviceMappings[].ebs.volumeSize": GP3_SOURCES,
        "blockDeviceMappings[].ebs.encrypted": Doc(launch_template_bool, SRC_LAUNCH_TEMPLATE),
        "blockDeviceMappings[].ebs.deleteOnTermination": Doc(launch_template_bool, SRC_LAUNCH_TEMPLATE),
        "networkInterfaces[].deviceIndex": Api(
            "ec2", "CreateLaunchTemplate", "LaunchTemplateData.NetworkInterfaces[].DeviceIndex"),
        "networkInterfaces[].associatePublicIpAddress": Doc(launch_template_bool, SRC_LAUNCH_TEMPLATE),
        "networkInterfaces[].deleteOnTermination": Doc(launch_template_bool, SRC_LAUNCH_TEMPLATE),
        "networkInterfaces[].securityGroups[]": ID,
        "creditSpecification.cpuCredits": Doc(one_of("standard", "unlimited"), "EC2 CreditSpecificationRequest CpuCredits"),
        "tagSpecifications[].resourceType": Api(
            "ec2", "CreateLaunchTemplate", "LaunchTemplateData.TagSpecifications[].ResourceType"),
        "tagSpecifications[].tags{k}": Doc(ec2_tag_key, SRC_EC2_TAGS),
        "tagSpecifications[].tags{v}": Doc(ec2_tag_value, SRC_EC2_TAGS),
        "updateDefaultVersion": Local("provider behaviour: each new version becomes the default"),
        **TAGS,
    },
    "aws:autoscaling/group:Group": {
        "name": Api("autoscaling", "CreateAutoScalingGroup", "AutoScalingGroupName"),
        "minSize": Api("autoscaling", "CreateAutoScalingGroup", "MinSize"),
        "maxSize": Api("autoscaling", "CreateAutoScalingGroup", "MaxSize"),
        "desiredCapacity": Api("autoscaling", "CreateAutoScalingGroup", "DesiredCapacity"),
        "vpcZoneIdentifiers[]": ID,
        "launchTemplate.id": ID,
        "launchTemplate.version": Api("autoscaling", "CreateAutoScalingGroup", "LaunchTemplate.Version"),
        "targetGroupArns": Api("autoscaling", "CreateAutoScalingGroup", "TargetGroupARNs"),
        "targetGroupArns[]": ID,
        "healthCheckType": (Api("autoscaling", "CreateAutoScalingGroup", "HealthCheckType"),
                            Doc(one_of("EC2", "ELB", "VPC_LATTICE", "EBS"), SRC_ASG)),
        "healthCheckGracePeriod": Api("autoscaling", "CreateAutoScalingGroup", "HealthCheckGracePeriod"),
        "instanceRefresh.strategy": Api("autoscaling", "StartInstanceRefresh", "Strategy"),
        "instanceRefresh.preferences.minHealthyPercentage": Api(
            "autoscaling", "StartInstanceRefresh", "Preferences.MinHealthyPercentage"),
        "tags[].key": Api("autoscaling", "CreateAutoScalingGroup", "Tags[].Key"),
        "tags[].value": Api("autoscaling", "CreateAutoScalingGroup", "Tags[].Value"),
        "tags[].propagateAtLaunch": Api("autoscaling", "CreateAutoScalingGroup", "Tags[].PropagateAtLaunch"),
    },
    "aws:autoscaling/lifecycleHook:LifecycleHook": {
        "name": Api("autoscaling", "PutLifecycleHook", "LifecycleHookName"),
        "autoscalingGroupName": Api("autoscaling", "PutLifecycleHook", "AutoScalingGroupName"),
        "lifecycleTransition": (Api("autoscaling", "PutLifecycleHook", "LifecycleTransition"),
                                Doc(one_of("autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"),
                                    SRC_ASG)),
        "heartbeatTimeout": (Api("autoscaling", "PutLifecycleHook", "HeartbeatTimeout"), Doc(integer(30, 7200), SRC_ASG)),
        "defaultResult": (Api("autoscaling", "PutLifecycleHook", "DefaultResult"), Doc(one_of("CONTINUE", "ABANDON"), SRC_ASG)),
    },
    "aws:rds/subnetGroup:SubnetGroup": {
        "description": Api("rds", "CreateDBSubnetGroup", "DBSubnetGroupDescription"),
        "subnetIds": Api("rds", "CreateDBSubnetGroup", "SubnetIds"),  # at least two: resource_problems
        "subnetIds[]": ID,
        "tags{k}": Api("rds", "CreateDBSubnetGroup", "Tags[].Key"),
        "tags{v}": Api("rds", "CreateDBSubnetGroup", "Tags[].Value"),
    },
    "aws:rds/parameterGroup:ParameterGroup": {
        "family": (Api("rds", "CreateDBParameterGroup", "DBParameterGroupFamily"),
                   Doc(matches(r"postgres[0-9]{1,2}", "a PostgreSQL parameter group family"), SRC_RDS_PARAMETERS)),
        "description": Api("rds", "CreateDBParameterGroup", "Description"),
        "parameters[].name": Api("rds", "ModifyDBParameterGroup", "Parameters[].ParameterName"),
        "parameters[].value": Api("rds", "ModifyDBParameterGroup", "Parameters[].ParameterValue"),
        "parameters[].applyMethod": Api("rds", "ModifyDBParameterGroup", "Parameters[].ApplyMethod"),
        "tags{k}": Api("rds", "CreateDBParameterGroup", "Tags[].Key"),
        "tags{v}": Api("rds", "CreateDBParameterGroup", "Tags[].Value"),
    },
    "aws:rds/instance:Instance": {
        "engine": (Api("rds", "CreateDBInstance", "Engine"), Doc(one_of("postgres"), SRC_RDS)),
        "engineVersion": (Api("rds", "CreateDBInstance", "EngineVersion"),
                          Doc(matches(r"[0-9]{1,2}(\.[0-9]{1,2})?", "a PostgreSQL version (major or major.minor)"), SRC_RDS)),
        "instanceClass": (Api("rds", "CreateDBInstance", "DBInstanceClass"),
                          Doc(matches(r"db\.[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.[0-9]*[a-z0-9]+", "an RDS instance class"), SRC_RDS)),
        "allocatedStorage": (Api("rds", "CreateDBInstance", "AllocatedStorage"), Doc(integer(20, 65536), SRC_RDS)),
        "maxAllocatedStorage": (Api("rds", "CreateDBInstance", "MaxAllocatedStorage"), Doc(integer(21, 65536), SRC_RDS)),
        "storageType": (Api("rds", "CreateDBInstance", "StorageType"), Doc(one_of("gp2", "gp3", "io1", "io2", "standard"), SRC_RDS)),
        "storageEncrypted": Api("rds", "CreateDBInstance", "StorageEncrypted"),
        "multiAz": Api("rds", "CreateDBInstance", "MultiAZ"),
        "publiclyAccessible": Api("rds", "CreateDBInstance", "PubliclyAccessible"),
        "dbSubnetGroupName": ID,
        "vpcSecurityGroupIds": Api("rds", "CreateDBInstance", "VpcSecurityGroupIds"),
        "vpcSecurityGroupIds[]": ID,
        "port": (Api("rds", "CreateDBInstance", "Port"), Doc(integer(1150, 65535), SRC_RDS)),
        "parameterGroupName": ID,
        "dbName": (Api("rds", "CreateDBInstance", "DBName"), Doc(matches(r"[A-Za-z][A-Za-z0-9_]{0,62}", "a database name"), SRC_RDS)),
        "username": (Api("rds", "CreateDBInstance", "MasterUsername"), Doc(rds_master_username, SRC_RDS)),
        "manageMasterUserPassword": Api("rds", "CreateDBInstance", "ManageMasterUserPassword"),
        "deletionProtection": Api("rds", "CreateDBInstance", "DeletionProtection"),
        "skipFinalSnapshot": Api("rds", "DeleteDBInstance", "SkipFinalSnapshot"),
        "finalSnapshotIdentifier": (Api("rds", "DeleteDBInstance", "FinalDBSnapshotIdentifier"), Doc(rds_identifier(255), SRC_RDS)),
        "backupRetentionPeriod": (Api("rds", "CreateDBInstance", "BackupRetentionPeriod"), Doc(integer(0, 35), SRC_RDS)),
        "backupWindow": (Api("rds", "CreateDBInstance", "PreferredBackupWindow"), Doc(rds_window(False), SRC_RDS)),
        "maintenanceWindow": (Api("rds", "CreateDBInstance", "PreferredMaintenanceWindow"), Doc(rds_window(True), SRC_RDS)),
        "autoMinorVersionUpgrade": Api("rds", "CreateDBInstance", "AutoMinorVersionUpgrade"),
        "copyTagsToSnapshot": Api("rds", "CreateDBInstance", "CopyTagsToSnapshot"),
        "allowMajorVersionUpgrade": Api("rds", "ModifyDBInstance", "AllowMajorVersionUpgrade"),
        "applyImmediately": Api("rds", "ModifyDBInstance", "ApplyImmediately"),
        "tags{k}": Api("rds", "CreateDBInstance", "Tags[].Key"),
        "tags{v}": Api("rds", "CreateDBInstance", "Tags[].Value"),
    },
    "aws:elasticache/subnetGroup:SubnetGroup": {
        "name": (Api("elasticache", "CreateCacheSubnetGroup", "CacheSubnetGroupName"),
                 Doc(matches(r"[a-z0-9-]{1,255}", "a cache subnet group name"), SRC_ELASTICACHE)),
        "description": Api("elasticache", "CreateCacheSubnetGroup", "CacheSubnetGroupDescription"),
        "subnetIds": Api("elasticache", "CreateCacheSubnetGroup", "SubnetIds"),  # at least two: resource_problems
        "subnetIds[]": ID,
        "tags{k}": Api("elasticache", "CreateCacheSubnetGroup", "Tags[].Key"),
        "tags{v}": Api("elasticache", "CreateCacheSubnetGroup", "Tags[].Value"),
    },
    "aws:elasticache/replicationGroup:ReplicationGroup": {
        "replicationGroupId": (Api("elasticache", "CreateReplicationGroup", "ReplicationGroupId"),
                               Doc(length(1, 40), SRC_ELASTICACHE),
                               Doc(matches(r"[a-z](?:-?[a-z0-9])*", "a replication group id (stored lower case)"),
                                   SRC_ELASTICACHE)),
        "description": Api("elasticache", "CreateReplicationGroup", "ReplicationGroupDescription"),
        "engine": (Api("elasticache", "CreateReplicationGroup", "Engine"), Doc(one_of("valkey", "redis"), SRC_ELASTICACHE)),
        "engineVersion": (Api("elasticache", "CreateReplicationGroup", "EngineVersion"),
                          Doc(matches(r"[0-9]{1,2}\.[0-9]{1,2}", "an engine version major.minor"), SRC_ELASTICACHE)),
        "nodeType": (Api("elasticache", "CreateReplicationGroup", "CacheNodeType"),
                     Doc(matches(r"cache\.[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.[0-9]*[a-z0-9]+", "an ElastiCache node type"),
                         SRC_ELASTICACHE)),
        "numCacheClusters": (Api("elasticache", "CreateReplicationGroup", "NumCacheClusters"),
                             Doc(integer(1, 6), SRC_ELASTICACHE)),
        "automaticFailoverEnabled": Api("elasticache", "CreateReplicationGroup", "AutomaticFailoverEnabled"),
        "multiAzEnabled": Api("elasticache", "CreateReplicationGroup", "MultiAZEnabled"),
        "port": Api("elasticache", "CreateReplicationGroup", "Port"),
        "subnetGroupName": ID,
        "securityGroupIds": Api("elasticache", "CreateReplicationGroup", "SecurityGroupIds"),
        "securityGroupIds[]": ID,
        "transitEncryptionEnabled": Api("elasticache", "CreateReplicationGroup", "TransitEncryptionEnabled"),
        "atRestEncryptionEnabled": Api("elasticache", "CreateReplicationGroup", "AtRestEncryptionEnabled"),
        "authToken": (Api("elasticache", "CreateReplicationGroup", "AuthToken"),
                      Doc(matches(r"[!#-.0-?A-~]{16,128}", "an AUTH token"), SRC_ELASTICACHE)),
        "networkType": Api("elasticache", "CreateReplicationGroup", "NetworkType"),
        "snapshotRetentionLimit": (Api("elasticache", "CreateReplicationGroup", "SnapshotRetentionLimit"),
                                   Doc(integer(0, 35), SRC_ELASTICACHE)),
        "snapshotWindow": (Api("elasticache", "CreateReplicationGroup", "SnapshotWindow"),
                           Doc(rds_window(False, 60, "ElastiCache"), SRC_ELASTICACHE)),
        "maintenanceWindow": (Api("elasticache", "CreateReplicationGroup", "PreferredMaintenanceWindow"),
                              Doc(rds_window(True, 60, "ElastiCache"), SRC_ELASTICACHE)),
        "autoMinorVersionUpgrade": Api("elasticache", "CreateReplicationGroup", "AutoMinorVersionUpgrade"),
        "applyImmediately": Api("elasticache", "ModifyReplicationGroup", "ApplyImmediately"),
        "tags{k}": Api("elasticache", "CreateReplicationGroup", "Tags[].Key"),
        "tags{v}": Api("elasticache", "CreateReplicationGroup", "Tags[].Value"),
    },
    # Cloudflare
    "cloudflare:index/dnsRecord:DnsRecord": {
        "zoneId": Doc(cf_id, SRC_CF_ID),
        "name": Doc(record_name, SRC_CF_DNS),
        "type": Doc(one_of("A", "AAAA", "CNAME", "MX", "NS", "OPENPGPKEY", "PTR", "TXT", "CAA", "CERT", "DNSKEY", "DS",
                           "HTTPS", "LOC", "NAPTR", "SMIMEA", "SRV", "SSHFP", "SVCB", "TLSA", "URI"), SRC_CF_DNS),
        "ttl": Doc(lambda v: None if v == 1 or (isinstance(v, int | float) and 60 <= v <= 86400)
                   else f"ttl {v!r}: 1 (automatic) or 60-86400", SRC_CF_DNS),
        "content": Assigned("checked per record type below (content_problems)"),
        "priority": Doc(integer(0, 65535), SRC_CF_DNS),
        "proxied": Doc(boolean, SRC_CF_PROXIED),  # which record may be proxied: resource_problems
        "comment": Doc(length(0, 100), SRC_CF_COMMENT),
        "data.priority": Doc(integer(0, 65535), SRC_CF_DATA),
        "data.weight": Doc(integer(0, 65535), SRC_CF_DATA),
        "data.port": Doc(integer(0, 65535), SRC_CF_DATA),
        "data.target": Doc(lambda v: None if v == "." else hostname(v), SRC_CF_DATA),
        "data.flags": Doc(integer(0, 255), SRC_CF_DATA),
        "data.tag": Doc(one_of("issue", "issuewild", "iodef"), SRC_CF_DATA),
        "data.value": Doc(length(1, 255), SRC_CF_DATA),
    },
    "cloudflare:index/apiToken:ApiToken": {
        "name": Doc(length(1, 120), SRC_CF_TOKEN),
        "policies[].effect": Doc(one_of("allow", "deny"), SRC_CF_TOKEN),
        "policies[].permissionGroups[].id": Doc(cf_id, SRC_CF_ID),
        "policies[].resources": Doc(token_resources, SRC_CF_TOKEN),
    },
    "cloudflare:index/workersScript:WorkersScript": {
        "accountId": Doc(cf_id, SRC_CF_ID),
        "scriptName": Doc(matches(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", "a Worker name"), SRC_CF_WORKER),
        "content": Doc(byte_length(3 * 1024 * 1024), SRC_CF_WORKER),
        "mainModule": Doc(matches(r"[A-Za-z0-9_.-]+\.m?js", "a module file name"), SRC_CF_WORKER),
        "compatibilityDate": Doc(iso_date_not_future, SRC_CF_WORKER),
        "bindings[].name": Doc(matches(r"[A-Za-z_$][A-Za-z0-9_$]{0,63}", "a JavaScript variable name"), SRC_CF_BINDING),
        "bindings[].type": Doc(one_of("secret_text", "plain_text", "json"), SRC_CF_BINDING),
        "bindings[].text": Doc(byte_length(5 * 1024), SRC_CF_BINDING),
    },
    "cloudflare:index/workersCustomDomain:WorkersCustomDomain": {
        "accountId": Doc(cf_id, SRC_CF_ID),
        "zoneId": Doc(cf_id, SRC_CF_ID),
        "hostname": Doc(hostname, SRC_CF_DOMAIN),
        "service": Doc(matches(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", "a Worker name"), SRC_CF_WORKER),
        "environment": Doc(deprecated("`environment` is deprecated; leave it unset"), SRC_CF_DOMAIN),
    },
    "cloudflare:index/zeroTrustTunnelCloudflared:ZeroTrustTunnelCloudflared": {
        "accountId": Doc(cf_id, SRC_CF_ID),
        "name": Doc(text, SRC_CF_TUNNEL),
        "configSrc": Doc(one_of("local", "cloudflare"), SRC_CF_TUNNEL),
        "tunnelSecret": Doc(tunnel_secret, SRC_CF_TUNNEL),
    },
    "cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig": {
        "accountId": Doc(cf_id, SRC_CF_ID),
        "tunnelId": Assigned("the tunnel's id"),
        "config.ingresses[].hostname": Doc(hostname, SRC_CF_TUNNEL_CONFIG),
        "config.ingresses[].service": Doc(matches(r"https?://[0-9a-z.:\[\]-]+|http_status:[1-5][0-9]{2}",
                                                  "an origin URL or http_status:<code>"), SRC_CF_TUNNEL_CONFIG),
    },
    "cloudflare:index/zeroTrustAccessApplication:ZeroTrustAccessApplication": {
        "accountId": Doc(cf_id, SRC_CF_ID),
        "name": Doc(text, SRC_CF_ACCESS_APP),
        "type": Doc(one_of("self_hosted", "saas", "ssh", "vnc", "app_launcher", "warp", "biso", "bookmark", "dash_sso",
                           "infrastructure", "rdp", "mcp", "mcp_portal", "proxy_endpoint"), SRC_CF_ACCESS_APP),
        "destinations[].type": Doc(one_of("public", "private"), SRC_CF_ACCESS_APP),
        "destinations[].uri": Doc(hostname, SRC_CF_ACCESS_APP),
        "allowedIdps[]": Doc(matches(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "an identity provider id"),
                             SRC_CF_ACCESS_APP),
        "autoRedirectToIdentity": Doc(boolean, SRC_CF_ACCESS_APP),  # with one identity provider: resource_problems
        "sessionDuration": Doc(go_duration, SRC_CF_ACCESS_APP),
        "appLauncherVisible": Doc(boolean, SRC_CF_ACCESS_APP),
        "policies[].id": Assigned("the Access policy's id"),
        "policies[].precedence": Doc(integer(1, 2**31 - 1), SRC_CF_ACCESS_APP),
    },
    "cloudflare:index/zeroTrustAccessPolicy:ZeroTrustAccessPolicy": {
        "accountId": Doc(cf_id, SRC_CF_ID),
        "name": Doc(text, SRC_CF_ACCESS_POLICY),
        "decision": Doc(one_of("allow", "deny", "non_identity", "bypass"), SRC_CF_ACCESS_POLICY),
        "includes[].emailDomain.domain": Doc(hostname, SRC_CF_ACCESS_POLICY),
        "includes[].email.email": Doc(matches(r"[^@\s]+@[^@\s]+", "an address"), SRC_CF_ACCESS_POLICY),
        "sessionDuration": Doc(go_duration, SRC_CF_ACCESS_POLICY),
    },
    # Local providers: nothing goes to AWS or Cloudflare.
    "random:index/randomBytes:RandomBytes": {"length": Local("pulumi-random")},
    "random:index/randomPassword:RandomPassword": {"length": Local("pulumi-random"), "special": Local("pulumi-random")},
    "tls:index/privateKey:PrivateKey": {"algorithm": Local("pulumi-tls"), "rsaBits": Local("pulumi-tls")},
    "command:local:Command": {"create": Local("pulumi-command runs it here"), "dir": Local("pulumi-command"),
                              "stdin": Local("pulumi-command"), "triggers[]": Local("pulumi-command")},
}

# Inputs whose children are map entries: their keys and values are checked as `<path>{k}` / `<path>{v}`.
MAP_INPUTS = ("tags", "dimensions", "policyDetails.targetTags", "policyDetails.schedules[].tagsToAdd",
              "tagSpecifications[].tags")

# Names the provider makes up from the logical name: pulumi-aws auto-naming appends '-' and 7
# random characters. (type, name field's API rule)
AUTONAMED: dict[str, Rule] = {
    "aws:iam/role:Role": Api("iam", "CreateRole", "RoleName"),
    "aws:iam/rolePolicy:RolePolicy": Api("iam", "PutRolePolicy", "PolicyName"),
    "aws:iam/instanceProfile:InstanceProfile": Api("iam", "CreateInstanceProfile", "InstanceProfileName"),
    "aws:ec2/securityGroup:SecurityGroup": Doc(sg_text, SRC_SG),
    "aws:cloudwatch/metricAlarm:MetricAlarm": Api("cloudwatch", "PutMetricAlarm", "AlarmName"),
    "aws:sns/topic:Topic": Doc(matches(r"[A-Za-z0-9_-]{1,256}", "an SNS topic name"), SRC_SNS),
    "aws:iam/user:User": Api("iam", "CreateUser", "UserName"),
    "aws:iam/userPolicy:UserPolicy": Api("iam", "PutUserPolicy", "PolicyName"),
    "aws:lb/loadBalancer:LoadBalancer": Doc(elb_name, SRC_ELB_NAMES),
    "aws:lb/targetGroup:TargetGroup": Doc(elb_name, SRC_ELB_NAMES),
    "aws:ec2/launchTemplate:LaunchTemplate": Api("ec2", "CreateLaunchTemplate", "LaunchTemplateName"),
    "aws:rds/instance:Instance": Doc(rds_identifier(63), SRC_RDS),
    "aws:rds/subnetGroup:SubnetGroup": Doc(matches(r"[a-z0-9 ._-]{1,255}", "a DB subnet group name (lower case)"), SRC_RDS),
    "aws:rds/parameterGroup:ParameterGroup": Doc(rds_identifier(255), SRC_RDS_PARAMETERS),
}
AUTONAME_SUFFIX = "-a1b2c3d"


# --- checking -----------------------------------------------------------------------------------


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(normalised path, value) of every leaf input; lists as `[]`, map entries as `{k}`/`{v}`."""
    if path in MAP_INPUTS and isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}{{k}}", k
            yield f"{path}{{v}}", v
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        if path:
            yield path, value  # the list itself (its length)
        for v in value:
            yield from leaves(v, f"{path}[]")
    else:
        yield path, value


def _as_rules(rules: Rules) -> tuple[Rule, ...]:
    return rules if isinstance(rules, tuple) else (rules,)


def apply_rule(rule: Rule, value: Any) -> list[str]:
    if isinstance(rule, Api):
        shape = api_shape(rule)
        if isinstance(value, list) and shape.type_name != "list":
            return []  # the list itself; its members are checked as path[]
        return check_shape(shape, value)
    if isinstance(rule, Doc):
        if isinstance(value, list):
            return []
        problem = rule.check(value)
        return [problem] if problem else []
    return []


def source_of(rule: Rule) -> str:
    if isinstance(rule, Api):
        return f"botocore {rule.service} {rule.operation} {rule.member}"
    if isinstance(rule, Doc):
        return rule.source
    return rule.why


def content_problems(r: Registered) -> list[str]:
    """Cloudflare record content, by record type."""
    i = r.inputs
    kind, content = i.get("type"), i.get("content")
    if kind in ("MX", "SRV", "URI") and i.get("priority") is None:
        return [f"{kind} records need the top-level priority (the provider reports a perpetual diff without it)"]
    if kind == "A":
        try:
            ipaddress.IPv4Address(content)
        except ValueError:
            return [f"A content {content!r} is not an IPv4 address"]
    if kind == "AAAA":
        try:
            ipaddress.IPv6Address(content)
        except ValueError:
            return [f"AAAA content {content!r} is not an IPv6 address"]
    if kind in ("MX", "CNAME"):
        problem = hostname(content)
        return [problem] if problem else []
    if kind == "TXT":
        problem = txt_content(content)
        return [problem] if problem else []
    if kind in ("SRV", "CAA") and not i.get("data"):
        return [f"{kind} records take structured data"]
    return []


def resource_problems(r: Registered) -> list[tuple[str, str, str]]:
    """Cross-field rules: (path, message, source)."""
    i = r.inputs
    found: list[tuple[str, str, str]] = []
    if r.type == "aws:ebs/volume:Volume" and i.get("type") == "gp3":
        size, iops, throughput = i.get("size", 0), i.get("iops", 3000), i.get("throughput", 125)
        if iops > 500 * size:
            found.append(("iops", f"{iops} IOPS on {size} GiB; gp3 allows at most 500 per GiB", SRC_GP3))
        if throughput > iops / 4:
            found.append(("throughput", f"{throughput} MiB/s with {iops} IOPS; gp3 allows at most 0.25 MiB/s per IOPS", SRC_GP3))
    if r.type == "cloudflare:index/dnsRecord:DnsRecord":
        found += [("content", p, SRC_CF_TXT if i.get("type") == "TXT" else SRC_CF_DNS) for p in content_problems(r)]
        tunnel = i.get("type") == "CNAME" and str(i.get("content", "")).endswith(".cfargotunnel.com")
        if i.get("proxied") and not tunnel:
            found.append(("proxied", "only webmail's CNAME to its tunnel is proxied; mail records never are", SRC_CF_PROXIED))
        if tunnel and not i.get("proxied"):
            found.append(("proxied", "a CNAME to a tunnel answers only through Cloudflare's proxy", SRC_CF_PROXIED))
    if r.type == "cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig":
        problem = tunnel_ingress((i.get("config") or {}).get("ingresses"))
        if problem:
            found.append(("config.ingresses", problem, SRC_CF_TUNNEL_CONFIG))
    if (r.type == "cloudflare:index/zeroTrustAccessApplication:ZeroTrustAccessApplication"
            and i.get("autoRedirectToIdentity") and len(i.get("allowedIdps") or []) != 1):
        found.append(("autoRedirectToIdentity", "needs exactly one allowedIdps entry", SRC_CF_ACCESS_APP))
    if r.type == "aws:ec2/instance:Instance" and i.get("rootBlockDevice", {}).get("volumeType") == "gp3":
        size = i["rootBlockDevice"].get("volumeSize", 8)
        if not 1 <= size <= 16384:
            found.append(("rootBlockDevice.volumeSize", f"{size} GiB outside gp3's 1-16384", SRC_GP3))
    if r.type == "aws:rds/subnetGroup:SubnetGroup" and len(i.get("subnetIds") or []) < 2:
        found.append(("subnetIds", "fewer than two subnets (one per zone)", SRC_RDS_SUBNETS))
    if r.type == "aws:elasticache/subnetGroup:SubnetGroup" and len(i.get("subnetIds") or []) < 2:
        found.append(("subnetIds", "fewer than two subnets (one per zone: a replica in another zone)", SRC_ELASTICACHE))
    if r.type == "aws:elasticache/replicationGroup:ReplicationGroup":
        nodes = i.get("numCacheClusters", 1)
        if i.get("multiAzEnabled") and not i.get("automaticFailoverEnabled"):
            found.append(("multiAzEnabled", "Multi-AZ needs automaticFailoverEnabled", SRC_ELASTICACHE))
        if i.get("automaticFailoverEnabled") and isinstance(nodes, int) and nodes < 2:
            found.append(("numCacheClusters", f"{nodes} node; automatic failover needs a replica (2 or more)",
                          SRC_ELASTICACHE))
        if "authToken" in i and not i.get("transitEncryptionEnabled"):
            found.append(("authToken", "an AUTH token needs transitEncryptionEnabled", SRC_ELASTICACHE))
        daily, weekly = i.get("snapshotWindow"), i.get("maintenanceWindow")
        if windows_overlap(daily, weekly, 60):
            found.append(("snapshotWindow", f"overlaps maintenanceWindow {weekly}", SRC_ELASTICACHE))
    if r.type == "aws:rds/instance:Instance":
        if i.get("maxAllocatedStorage") is not None and i["maxAllocatedStorage"] <= i.get("allocatedStorage", 0):
            found.append(("maxAllocatedStorage", "storage autoscaling needs a maximum above allocatedStorage", SRC_RDS))
        daily, weekly = i.get("backupWindow"), i.get("maintenanceWindow")
        if windows_overlap(daily, weekly, 30):
            found.append(("backupWindow", f"overlaps maintenanceWindow {weekly}", SRC_RDS))
    if r.type in AUTONAMED and "name" not in i and "namePrefix" not in i:
        rule = AUTONAMED[r.type]
        name = r.name + AUTONAME_SUFFIX
        found += [("(auto-name)", f"{name!r}: {p}", source_of(rule) + "; pulumi-aws auto-naming appends '-' and 7 characters")
                  for p in apply_rule(rule, name)]
    return found


def check_resource(r: Registered) -> list[Problem]:
    table = INPUTS.get(r.type)
    if table is None:
        return [Problem(r.type, r.name, "", "resource type has no entry in tools.deploy_checks.INPUTS", "unmapped")]
    problems: list[Problem] = []
    for path, value in leaves(r.inputs):
        if value is None:
            continue
        rules = table.get(path)
        if rules is None:
            if isinstance(value, list) and any(k.startswith(path + "[]") for k in table):
                continue  # a list whose members are mapped
            problems.append(Problem(r.type, r.name, path, "input has no entry in tools.deploy_checks.INPUTS", "unmapped"))
            continue
        for rule in _as_rules(rules):
            problems += [Problem(r.type, r.name, path, m, source_of(rule)) for m in apply_rule(rule, value)]
    problems += [Problem(r.type, r.name, p, m, s) for p, m, s in resource_problems(r)]
    return problems


def check_run(run: MockRun) -> list[Problem]:
    """Every problem the real providers would raise for the resources of a mock run."""
    problems: list[Problem] = []
    for r in run.resources:
        if not r.custom:
            continue  # our own components: nothing is sent to a provider
        problems += check_resource(r)
    return problems


def main(argv: list[str] | None = None) -> int:
    from tools.plan import plan_stack_file

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m tools.deploy_checks Pulumi.<stack>.yaml", file=sys.stderr)
        return 2
    from components.settings import ConfigError
    from tools.stackfile import StackFileError

    try:
        _, run = plan_stack_file(Path(args[0]))
    except StackFileError as e:
        print(e, file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 2
    problems = check_run(run)
    for p in problems:
        print(p)
    print(f"{len(run.resources)} resources checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
