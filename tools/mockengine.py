"""Run the orgmail program on Pulumi's mock engine: no CLI, no credentials, no network.

Used by the offline plan and by the unit tests. Every registered resource is recorded with its
type, name, parent, options and inputs (camelCase wire names, as the engine sees them).
Provider-computed values are placeholders, listed in PLACEHOLDERS so the plan can mark them.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import pulumi
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

PLACEHOLDER_ACCOUNT = "123456789012"
PLACEHOLDER_AMI = "ami-debian13-placeholder"
PLACEHOLDER_IP_PREFIX = "192.0.2."  # TEST-NET-1 (RFC 5737): never a real address
PLACEHOLDER_IPV6_BLOCK = "2001:db8:4200:100::/56"
PLACEHOLDER_CF_TOKEN = "placeholder-cloudflare-token"
PLACEHOLDER_TUNNEL_TOKEN = "placeholder-tunnel-token"

# pulumi-random hashes RandomPassword results with Go's bcrypt.DefaultCost (10). A plan never shows
# the hashes (they are secrets), so it uses the cheapest cost (4); at 10 rounds hashing alone took
# about 50 ms per mailbox. Tests that boot a host ask for the provider's cost, so Dovecot is proven
# against the hashes a real deploy hands it.
PROVIDER_BCRYPT_COST = 10
PLAN_BCRYPT_COST = 4

PLACEHOLDERS: dict[str, str] = {
    PLACEHOLDER_ACCOUNT: "AWS account id (known at deploy time)",
    PLACEHOLDER_AMI: "Debian 13 AMI id (looked up at deploy time)",
    PLACEHOLDER_IP_PREFIX + "*": "Elastic IP addresses (allocated at deploy time)",
    PLACEHOLDER_IPV6_BLOCK: "the VPC's Amazon-provided IPv6 block",
    PLACEHOLDER_CF_TOKEN: "the certbot Cloudflare token (created at deploy time)",
    PLACEHOLDER_TUNNEL_TOKEN: "the webmail Cloudflare Tunnel's token (read from Cloudflare at deploy time)",
    "vol-/i-/eipalloc-/... ids": "resource ids, assigned by AWS at deploy time",
}

_SECRET_SIG = rpc._special_secret_sig
_SIG_KEY = rpc._special_sig_key


def unwrap(value: Any) -> tuple[Any, bool]:
    """(plain value, whether any part of it was marked secret)."""
    if isinstance(value, dict):
        if value.get(_SIG_KEY) == _SECRET_SIG:
            plain, _ = unwrap(value.get("value"))
            return plain, True
        secret = False
        out = {}
        for k, v in value.items():
            out[k], s = unwrap(v)
            secret = secret or s
        return out, secret
    if isinstance(value, list):
        items = [unwrap(v) for v in value]
        return [i[0] for i in items], any(i[1] for i in items)
    return value, False


def mask(value: Any) -> Any:
    """The value with every secret part replaced by "[secret]"."""
    if isinstance(value, dict):
        if value.get(_SIG_KEY) == _SECRET_SIG:
            return "[secret]"
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


@dataclass
class Registered:
    type: str
    name: str
    urn: str
    id: str
    parent: str
    custom: bool
    protect: bool
    dependencies: list[str]
    ignore_changes: list[str]
    raw_inputs: dict[str, Any]  # with secret markers
    outputs: dict[str, Any] = field(default_factory=dict)
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)
    delete_before_replace: bool = False
    # URNs this resource had before (its aliases, resolved as the engine resolves them).
    alias_urns: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> dict[str, Any]:
        return unwrap(self.raw_inputs)[0]

    @property
    def masked_inputs(self) -> dict[str, Any]:
        return mask(self.raw_inputs)


def _fake_id(type_: str, name: str) -> str:
    digest = hashlib.sha256(f"{type_}/{name}".encode()).hexdigest()
    prefixes = {
        "aws:ec2/vpc:Vpc": "vpc-", "aws:ec2/subnet:Subnet": "subnet-", "aws:ec2/instance:Instance": "i-",
        "aws:ebs/volume:Volume": "vol-", "aws:ec2/eip:Eip": "eipalloc-",
        "aws:ec2/securityGroup:SecurityGroup": "sg-", "aws:ec2/internetGateway:InternetGateway": "igw-",
        "aws:ec2/routeTable:RouteTable": "rtb-", "aws:ec2/amiCopy:AmiCopy": "ami-",
        "aws:ec2/networkInterface:NetworkInterface": "eni-", "aws:ec2/launchTemplate:LaunchTemplate": "lt-",
    }
    prefix = prefixes.get(type_)
    return f"{prefix}0{digest[:16]}" if prefix else f"{name}-id"


# What the account's permissions boundary holds: this version's document (the default), another
# document (JSON), or MISSING_BOUNDARY (IAM answers NoSuchEntity, as when no admin created it).
MISSING_BOUNDARY = None
BOUNDARY_AS_SHIPPED = "as shipped"


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self, region: str, bcrypt_cost: int = PLAN_BCRYPT_COST,
                 boundary: str | None = BOUNDARY_AS_SHIPPED) -> None:
        self.region = region
        self.bcrypt_cost = bcrypt_cost
        self.boundary = boundary
        self._ips = 0
        self.invokes: set[str] = set()  # every data-source token the program called (IAM needs them too)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        inputs = dict(args.inputs)
        rid = _fake_id(args.typ, args.name)
        out: dict[str, Any] = {**inputs}
        t = args.typ
        if t == "aws:ec2/eip:Eip":
            self._ips += 1
            out.update(publicIp=f"{PLACEHOLDER_IP_PREFIX}{9 + self._ips}", allocationId=rid)
        elif t == "aws:ec2/vpc:Vpc":
            out.update(ipv6CidrBlock=PLACEHOLDER_IPV6_BLOCK)
        elif t == "aws:ec2/instance:Instance":
            out.update(privateIp="10.42.1.10", arn=f"arn:aws:ec2:{self.region}:{PLACEHOLDER_ACCOUNT}:instance/{rid}")
        elif t == "tls:index/privateKey:PrivateKey":
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(inputs.get("rsaBits", 2048)))
            out.update(
                privateKeyPem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()).decode(),
                publicKeyPem=key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode())
        elif t == "random:index/randomPassword:RandomPassword":
            password = base64.b32encode(hashlib.sha256(args.name.encode()).digest()).decode()[: int(inputs["length"])]
            out.update(result=password,
                       bcryptHash=bcrypt.hashpw(password.encode(), bcrypt.gensalt(self.bcrypt_cost, prefix=b"2a")).decode())
        elif t == "random:index/randomBytes:RandomBytes":
            raw = hashlib.sha256(args.name.encode()).digest()[: int(inputs["length"])]
            out.update(base64=base64.b64encode(raw).decode(), hex=raw.hex())
        elif t == "aws:s3/bucket:Bucket":
            rid = f"{inputs.get('bucketPrefix', args.name)}0{hashlib.sha256(args.name.encode()).hexdigest()[:12]}"
            out.update(bucket=rid, arn=f"arn:aws:s3:::{rid}")
        elif t == "aws:sns/topic:Topic":
            out.update(arn=f"arn:aws:sns:{self.region}:{PLACEHOLDER_ACCOUNT}:{args.name}")
        elif t == "cloudflare:index/apiToken:ApiToken":
            out.update(value=PLACEHOLDER_CF_TOKEN)
        elif t == "aws:iam/user:User":
            out.update(name=f"{args.name}-{rid[-8:]}", arn=f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:user/orgmail/{args.name}")
        elif t == "aws:iam/accessKey:AccessKey":
            # An access key id's shape (AKIA and 16 characters); the SMTP password is derived from the secret.
            rid = "AKIA" + hashlib.sha256(args.name.encode()).hexdigest()[:16].upper()
            out.update(sesSmtpPasswordV4="B" + base64.b64encode(hashlib.sha256(rid.encode()).digest()).decode()[:43],
                       secret="placeholder-secret-access-key")
        elif t == "aws:iam/instanceProfile:InstanceProfile":
            out.update(name=f"{args.name}-{rid[-8:]}", arn=f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:role/{args.name}")
        elif t == "aws:rds/instance:Instance":  # the directory: its address and the secret RDS manages
            out.update(address=f"{args.name}.placeholder.{self.region}.rds.amazonaws.com", port=inputs.get("port", 5432),
                       arn=f"arn:aws:rds:{self.region}:{PLACEHOLDER_ACCOUNT}:db:{args.name}",
                       masterUserSecrets=[{"secretArn": f"arn:aws:secretsmanager:{self.region}:{PLACEHOLDER_ACCOUNT}:"
                                                        f"secret:rds!db-placeholder", "secretStatus": "active"}])
        elif t == "aws:rds/subnetGroup:SubnetGroup" or t == "aws:rds/parameterGroup:ParameterGroup":
            out.update(name=f"{args.name}-{rid[-8:]}")
        elif t in ("aws:lb/loadBalancer:LoadBalancer", "aws:lb/targetGroup:TargetGroup", "aws:lb/listener:Listener"):
            kind = t.rsplit(":", 1)[1].lower().replace("loadbalancer", "loadbalancer/net")
            rid = f"arn:aws:elasticloadbalancing:{self.region}:{PLACEHOLDER_ACCOUNT}:{kind}/{args.name}/0123456789abcdef"
            out.update(arn=rid)
        elif t == "aws:ec2/launchTemplate:LaunchTemplate":
            out.update(latestVersion=1)
        elif t == "aws:autoscaling/group:Group":
            rid = str(inputs.get("name", args.name))
            out.update(name=rid, arn=f"arn:aws:autoscaling:{self.region}:{PLACEHOLDER_ACCOUNT}:autoScalingGroup:"
                                      f"00000000-0000-0000-0000-000000000000:autoScalingGroupName/{rid}")
        elif t == "aws:iam/role:Role":  # a role's ARN holds its path
            out.update(name=f"{args.name}-{rid[-8:]}",
                       arn=f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:role{inputs.get('path', '/')}{args.name}")
        return rid, out

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        tok = args.token
        self.invokes.add(tok)
        if tok == "aws:ec2/getAmi:getAmi":
            return {"id": PLACEHOLDER_AMI, "imageId": PLACEHOLDER_AMI, "name": "debian-13-amd64-placeholder",
                    "architecture": "x86_64", "ownerId": "136693071363"}, []
        if tok == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": PLACEHOLDER_ACCOUNT, "arn": f"arn:aws:iam::{PLACEHOLDER_ACCOUNT}:user/plan",
                    "id": PLACEHOLDER_ACCOUNT, "userId": "PLAN"}, []
        if tok == "aws:index/getAvailabilityZones:getAvailabilityZones":
            names = [f"{self.region}{s}" for s in "abc"]
            return {"id": self.region, "names": names, "zoneIds": names}, []
        if tok == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            # As in many regions: the first zone lacks the newer and larger types.
            wanted: list[str] = next((f["values"] for f in args.args.get("filters", []) if f["name"] == "instance-type"), [])
            pairs = [(t, f"{self.region}{z}") for z in "abc" for t in wanted
                     if z != "a" or not t.startswith(("m6in", "m7"))]
            return {"id": self.region, "instanceTypes": [p[0] for p in pairs], "locations": [p[1] for p in pairs],
                    "locationTypes": ["availability-zone"] * len(pairs)}, []
        if tok == "aws:iam/getPolicy:getPolicy":  # the permissions boundary (components/boundary.py)
            arn = str(args.args.get("arn"))
            if self.boundary is MISSING_BOUNDARY:
                return {}, [("arn", f"reading IAM Policy ({arn}): NoSuchEntity: Policy {arn} does not exist "
                                    "or is not attachable.")]
            if self.boundary == BOUNDARY_AS_SHIPPED:
                from components.boundary import boundary_document
                document = json.dumps(boundary_document())
            else:
                document = self.boundary
            name = arn.rsplit("/", 1)[-1]
            return {"id": arn, "arn": arn, "name": name, "path": arn.split(":policy", 1)[1][: -len(name)],
                    "policy": document, "policyId": "ANPAPLACEHOLDER", "attachmentCount": 0, "tags": {},
                    "description": ""}, []
        if tok == "cloudflare:index/getZeroTrustTunnelCloudflaredToken:getZeroTrustTunnelCloudflaredToken":
            return {"accountId": args.args.get("accountId"), "tunnelId": args.args.get("tunnelId"),
                    "token": PLACEHOLDER_TUNNEL_TOKEN}, []
        if tok == "aws:ec2/getSubnet:getSubnet":
            return {"id": args.args.get("id"), "availabilityZone": f"{self.region}a",
                    "vpcId": "vpc-0given"}, []
        raise NotImplementedError(f"no mock for invoke {tok}")


class DuplicateUrnError(Exception):
    """Two resources of one type and name under the same parent type: the engine refuses the deploy.
    (The failed run leaves registrations pending in the process: run such a case in a process of its own.)"""


class RecordingMonitor(pulumi_mocks.MockMonitor):
    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)
        self.registered: list[Registered] = []
        self._urns: set[str] = set()

    def _alias_urns(self, request: Any) -> list[str]:
        """The old URNs an alias spec names: unset fields default to the resource's own (as in the engine)."""
        urns = []
        for alias in request.aliases:
            if alias.urn:
                urns.append(alias.urn)
                continue
            spec = alias.spec
            parent = "" if spec.noParent else (spec.parentUrn or request.parent)
            urns.append(self.make_urn(parent, spec.type or request.type, spec.name or request.name))
        return urns

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        # The engine stops a deploy at a second resource with the same URN ("Duplicate resource URN");
        # the mock monitor would silently keep both.
        if response.urn in self._urns:
            raise DuplicateUrnError(f"Duplicate resource URN {response.urn}")
        self._urns.add(response.urn)
        if request.type != "pulumi:pulumi:Stack":
            raw = rpc.deserialize_properties(request.object)
            state = self.resources.get(response.urn)
            self.registered.append(Registered(
                type=request.type, name=request.name, urn=response.urn, id=response.id, parent=request.parent,
                custom=request.custom, protect=request.protect, dependencies=list(request.dependencies),
                ignore_changes=list(request.ignoreChanges), raw_inputs=raw,
                outputs=dict(state.state) if state else {},
                property_dependencies={k: list(v.urns) for k, v in request.propertyDependencies.items() if v.urns},
                delete_before_replace=request.deleteBeforeReplace, alias_urns=self._alias_urns(request)))
        return response


@dataclass
class MockRun:
    resources: list[Registered]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    invokes: set[str] = field(default_factory=set)

    def of_type(self, type_: str) -> list[Registered]:
        return [r for r in self.resources if r.type == type_]

    def one(self, type_: str, name: str) -> Registered:
        found = [r for r in self.resources if r.type == type_ and r.name == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} resources {type_} named {name}")
        return found[0]


def pulumi_config_values(config: dict[str, Any]) -> dict[str, str]:
    """Stack-file config values as the engine passes them: strings, objects as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


def run_program(config: dict[str, Any], stack: str, bcrypt_cost: int = PLAN_BCRYPT_COST,
                project: str = "orgmail", boundary: str | None = BOUNDARY_AS_SHIPPED) -> MockRun:
    """Run the program for `config` (full keys, e.g. "orgmail:tier") on the mock engine.

    `bcrypt_cost` is the cost of the mock RandomPassword hashes (PROVIDER_BCRYPT_COST to match a deploy).
    `boundary`: what the account's permissions boundary holds (see RecordingMocks).

    Raises ConfigError (from settings) before any resource is registered when config is invalid.
    """
    from components.program import build, settings_from_config

    region = str(config.get("orgmail:region", "us-east-1"))
    mocks = RecordingMocks(region, bcrypt_cost, boundary)
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(pulumi_config_values(config))
    resolved: dict[str, Any] = {}
    secret: set[str] = set()

    # Awaited, not _sync_await-ed: a nested _sync_await pads the event loop with a cancelled handle
    # per pending callback, which made plans grow quadratically with the number of resources.
    async def program() -> None:
        settings = settings_from_config()
        outputs = build(settings)
        for key, value in outputs.items():
            out = pulumi.Output.from_input(value)
            resolved[key] = await out.future()
            if await out.is_secret():
                secret.add(key)

    _sync_await(run_pulumi_func(program))
    return MockRun(resources=list(monitor.registered), outputs=resolved, secret_outputs=secret,
                   invokes=set(mocks.invokes))
