"""The only differences between the booted test host and the one AWS would boot.

Everything else in the user-data is what `pulumi up` renders for the stack. See also the
harness's own overrides (NoCloud seed, loop-device data volume, pre-installed packages),
listed at the top of tests/e2e/harness.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from components.parameters import part_count, part_value
from components.userdata import HostConfig, bundle_parameter, render_bundle

if TYPE_CHECKING:
    from tests.e2e.harness import BootedHost
    from tools.mockengine import MockRun

MOTO_PORT = 5000
TEST_DOMAIN = "example.org"  # the dev stack's domain; never resolved outside the guest

# HostConfig fields the tests change:
HOST_OVERRIDES: dict[str, Any] = {
    "install_packages": False,  # packages are pre-installed in the root: the boot needs no network
    # No Let's Encrypt here: certbot's renewal timer is not started. The boot's one bounded attempt
    # still runs (and fails: nothing answers for Let's Encrypt), so the host serves a self-signed
    # certificate, or the one a test left on the data volume.
    "cert_timer": False,
    # The test world's root zone (tests/e2e/world.py) is not signed, so a resolver holding the real
    # root's trust anchor (Debian's, which production unbound uses) would find every answer bogus.
    # unbound runs without its validator module here; everything else about it is production's.
    "dnssec_validation": False,
    # SSM served by moto in the guest, with dummy credentials instead of the instance role's.
    "aws_environment": (
        ("AWS_ENDPOINT_URL", f"http://127.0.0.1:{MOTO_PORT}"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ),
}


def put_parameters(guest: BootedHost, endpoint: str, run: MockRun, region: str, host: HostConfig,
                   bundle: str | None = None) -> None:
    """Serve the stack's SSM parameters, as `pulumi up` would store them, in the stack's region
    (moto on the guest's loopback stands in for SSM). The booted `host`'s bundle is the one rendered
    with the test overrides, the bundle its (test) user-data names, unless `bundle` says otherwise."""
    serve_parameters(guest, endpoint, planned_parameters(run, host, bundle), region)


def planned_parameters(run: MockRun, host: HostConfig, bundle: str | None = None) -> dict[str, tuple[str, str]]:
    """The plan's SSM parameters, name -> (value, type), with the booted `host`'s bundle (see put_parameters)."""
    params = stored_parameters(run)
    params.update({n: (v, k) for n, v, k in bundle_parameters(run, host, render_bundle(host) if bundle is None else bundle)})
    return params


def bundle_parameters(run: MockRun, host: HostConfig, bundle: str) -> list[tuple[str, str, str]]:
    """`bundle` as the parts of `host`'s bundle parameter, as many as the plan stores (unused: "-")."""
    name = bundle_parameter(host)
    planned = [p for p in run.of_type("aws:ssm/parameter:Parameter") if p.inputs["name"].startswith(f"{name}/part-")]
    count = max(len(planned), part_count(len(bundle)))
    return [(f"{name}/part-{i:03d}", part_value(bundle, i, count, name), "String") for i in range(count)]


def trust_test_ca(guest: BootedHost, ca_pem: str) -> None:
    """Make the guest trust a test CA, as it trusts Let's Encrypt's roots on AWS: appended to the
    system CA store Postfix verifies the mailbox host's certificate against (smtp_tls_CAfile).
    New smtp processes read it; the reload retires idle ones."""
    guest.exec(["sh", "-c", "cat >> /etc/ssl/certs/ca-certificates.crt"], input=ca_pem, check=True)
    guest.exec(["postfix", "reload"], check=True)


# Webmail's cloudflared (tests/e2e/test_webmail.py): the guest cannot reach GitHub or Cloudflare. The config's
# pin points at a stand-in in the guest (file://), with that stand-in's SHA-256; orgmail-sync downloads,
# checks and installs it exactly as it would the release.
CLOUDFLARED_STANDIN_DIR = "/opt/orgmail-e2e"
CLOUDFLARED_STANDIN_URL = "file://" + CLOUDFLARED_STANDIN_DIR + "/cloudflared-linux-{arch}"


def stored_parameters(run: MockRun) -> dict[str, tuple[str, str]]:
    """The plan's SSM parameters: name -> (value, type)."""
    return {p.inputs["name"]: (p.inputs["value"], p.inputs["type"]) for p in run.of_type("aws:ssm/parameter:Parameter")}


def with_rewritten(params: dict[str, tuple[str, str]], path: str, change: Any) -> dict[str, tuple[str, str]]:
    """`params` with the JSON value stored in parts under `path` replaced by `change(value)`, in as many
    parts as before (or more)."""
    names = sorted(n for n in params if n.startswith(f"{path}/part-"))
    kind = params[names[0]][1]
    text = "".join(params[n][0] for n in names if params[n][0] != "-")
    new = change(text)
    count = max(len(names), part_count(len(new)))
    out = {n: v for n, v in params.items() if n not in names}
    out.update({f"{path}/part-{i:03d}": (part_value(new, i, count, path), kind) for i in range(count)})
    return out


def serve_parameters(guest: BootedHost, endpoint: str, params: dict[str, tuple[str, str]], region: str) -> None:
    rows = [(n, v, k) for n, (v, k) in sorted(params.items())]
    guest.aws(endpoint, f"ssm = boto3.client('ssm', endpoint_url=endpoint, region_name={region!r})\n"
                        f"for name, value, kind in {rows!r}:\n"
                        "    ssm.put_parameter(Name=name, Value=value, Type=kind, Overwrite=True)")
