"""A cluster role's bundle (components/userdata.py): the files that are the same on every host of a role
travel in SSM, not in EC2's 16 KB of user-data, and orgmail-unbundle (cloud-init/files/orgmail/unbundle.py)
writes them at the first boot only if they are the ones the host's user-data names."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from components.edge import edge_cluster_host, render_edge_files
from components.outbound_relay import relay_cluster_host, render_relay_files
from components.shard import render_shard_files, shard_cluster_host
from components.userdata import (
    CLUSTER_BOOT_FILES,
    EC2_USER_DATA_LIMIT,
    RenderedFile,
    bundle_files,
    bundle_sha256,
    cluster_user_data,
    compress_user_data,
    pack_bundle,
    role_bundle,
    role_bundle_parameters,
)
from tests.unit.conftest import host_script
from tests.unit.test_cluster_hosts import EDGE, RELAY, SHARD

unbundle = host_script("unbundle.py")

ROLES = {
    "edge": (edge_cluster_host(EDGE), render_edge_files(EDGE)),
    "shard": (shard_cluster_host(SHARD), render_shard_files(SHARD)),
    "relay": (relay_cluster_host(RELAY), render_relay_files(RELAY)),
}
BOOT_PATHS = {path for _, path, _ in CLUSTER_BOOT_FILES}


def named_sha(files: list[RenderedFile]) -> str:
    env = next(f.content for f in files if f.path == "/etc/orgmail/host.env")
    [sha] = re.findall(r"^BUNDLE_SHA256=([0-9a-f]{64})$", env, re.M)
    return sha


def as_ssm(parameters: dict[str, str]) -> list[dict[str, str]]:
    """What `aws ssm get-parameters-by-path` lists, in an order of its own (the script sorts by name)."""
    return [{"Name": k, "Value": v} for k, v in sorted(parameters.items(), reverse=True)]


@pytest.mark.parametrize("role", ROLES)
def test_the_user_data_carries_only_the_boot_files_and_the_bundle_the_rest(role: str) -> None:
    host, files = ROLES[role]
    text = cluster_user_data(host, files)
    assert len(compress_user_data(text)) <= EC2_USER_DATA_LIMIT // 2  # room to grow
    in_user_data = {f.path for f in files if not f.bundle}
    assert in_user_data >= BOOT_PATHS
    for f in files:
        assert (f"  - path: {f.path}\n" in text) == (not f.bundle), f.path
    bundle = bundle_files(role_bundle(files))
    assert set(bundle) == {f.path for f in files if f.bundle} and not BOOT_PATHS & set(bundle)
    assert named_sha(files) == bundle_sha256(role_bundle(files))


@pytest.mark.parametrize("role", ROLES)
def test_unbundle_writes_exactly_the_bundled_files(role: str, tmp_path: Path) -> None:
    host, files = ROLES[role]
    parameters = role_bundle_parameters(host.ssm_path, role_bundle(files))
    assert all(len(v.encode()) <= 4096 for v in parameters.values())  # standard SSM parameters
    written = unbundle.verified(unbundle.joined(as_ssm(parameters), f"{host.ssm_path}/bundle"), named_sha(files))
    for path, spec in written.items():
        unbundle.write(str(tmp_path / path.lstrip("/")), spec["content"], int(spec["mode"], 8))
    for f in files:
        target = tmp_path / f.path.lstrip("/")
        assert target.exists() == f.bundle, f.path
        if f.bundle:
            assert target.read_text() == f.content and oct(os.stat(target).st_mode & 0o777) == oct(int(f.mode, 8))


def test_a_bundle_changed_behind_pulumis_back_or_naming_odd_paths_writes_nothing() -> None:
    _, rendered = ROLES["edge"]
    bundle = role_bundle(rendered)
    sha = named_sha(rendered)
    files = bundle_files(bundle)
    files["/etc/postfix/main.cf"]["content"] = files["/etc/postfix/main.cf"]["content"].replace(
        "permit_mynetworks", "permit", 1)
    tampered = pack_bundle(json.dumps(files, separators=(",", ":"), sort_keys=True))
    with pytest.raises(RuntimeError, match="has SHA-256 .* nothing written"):
        unbundle.verified(tampered, sha)
    for path in ("etc/relative", "/etc/../root/.ssh/authorized_keys"):
        odd = pack_bundle(json.dumps({path: {"mode": "0644", "content": "x"}}))
        with pytest.raises(RuntimeError, match="the bundle names .* nothing written"):
            unbundle.verified(odd, bundle_sha256(odd))
    # Only the stored form: plain JSON with its own hash is not a bundle Pulumi stored.
    plain = json.dumps({"/etc/x": {"mode": "0644", "content": "x"}})
    with pytest.raises(RuntimeError, match="does not start with 'gzip\\+base64:'"):
        unbundle.verified(plain, bundle_sha256(plain))
    assert unbundle.verified(bundle, sha) == bundle_files(bundle)
    with pytest.raises(RuntimeError, match="no /orgmail/s/edge/bundle/part-NNN"):
        unbundle.joined([{"Name": "/orgmail/s/edge/config/part-000", "Value": "{}"}], "/orgmail/s/edge/bundle")
    # Another bundle's parts (a single host's under bundle/<host name>, another role's) are not this one's.
    with pytest.raises(RuntimeError, match="no /orgmail/s/edge/bundle/part-NNN"):
        unbundle.joined([{"Name": "/orgmail/s/edge/bundle/x.example/part-000", "Value": "{}"},
                         {"Name": "/orgmail/s/edge/bundlex/part-000", "Value": "{}"}], "/orgmail/s/edge/bundle")


def test_every_host_of_a_role_has_the_same_bundle() -> None:
    """The bundle is stored once per role (components/cluster.py): nothing in it may name one host."""
    other_shard = replace(SHARD, hostname="shard7.customers.example", data_volume_id="vol-0fff")
    assert role_bundle(render_shard_files(other_shard)) == role_bundle(ROLES["shard"][1])
    assert named_sha(render_shard_files(other_shard)) == named_sha(ROLES["shard"][1])
    other_relay = replace(RELAY, hostname="relay2.customers.example", queue_volume_id="vol-0fff")
    assert role_bundle(render_relay_files(other_relay)) == role_bundle(ROLES["relay"][1])


@pytest.mark.parametrize("role", ROLES)
def test_the_bootstrap_writes_the_bundle_before_it_reads_anything_else(role: str) -> None:
    _, files = ROLES[role]
    bootstrap = next(f.content for f in files if f.path == "/usr/local/sbin/orgmail-bootstrap")
    lines = [line.strip() for line in bootstrap.splitlines()]
    at = lines.index("/usr/local/sbin/orgmail-unbundle")
    assert lines.index("firewall") < at  # the firewall (in user-data) first
    first_use = min(i for i, line in enumerate(lines) if re.search(r"\$\(param |systemctl (re)?start|postconf|newaliases"
                                                                     r"|orgmail-volume|install -d", line))
    assert at < first_use, lines[first_use]


def test_every_shard_installs_orgmail_users_where_it_finds_its_schema() -> None:
    """`move` runs on a shard (its doveadm secret is there): the CLI, the schema file it reads and its Debian
    modules come with every shard."""
    from components.shard import SHARD_PACKAGES

    users = host_script("users.py")
    bundle = bundle_files(role_bundle(ROLES["shard"][1]))
    assert bundle["/usr/local/sbin/orgmail-users"]["mode"] == "0755"
    schema = (Path(__file__).resolve().parents[2] / "cloud-init/files/orgmail/directory.sql").read_text()
    assert bundle["/usr/local/share/orgmail/directory.sql"]["content"] == schema
    assert Path("/usr/local/share/orgmail/directory.sql") in users.SCHEMA_FILES
    assert users.DOVEADM_PASSWORD_FILE == "/etc/dovecot/orgmail-doveadm.conf"
    assert {"python3-psycopg", "python3-bcrypt"} <= set(SHARD_PACKAGES)


def test_session_manager_installs_the_ssm_agent_first_on_every_role_and_only_when_asked() -> None:
    """admin.ssmSessionManager (the cluster's administrators reach the shards and the directory through it):
    AWS's agent package, the single host's URL, installed before SSM is asked anything and never failing the
    boot; without the setting nothing is fetched."""
    sync = host_script("sync.py")
    from components.userdata import SSM_AGENT_URL

    assert SSM_AGENT_URL == sync.SSM_AGENT_URL
    on = {"edge": render_edge_files(replace(EDGE, ssm_agent=True)),
          "shard": render_shard_files(replace(SHARD, ssm_agent=True)),
          "relay": render_relay_files(replace(RELAY, ssm_agent=True))}
    for role, files in on.items():
        bootstrap = next(f.content for f in files if f.path == "/usr/local/sbin/orgmail-bootstrap")
        url = SSM_AGENT_URL.format(region="eu-west-1", arch="$(dpkg --print-architecture)")
        assert f'curl -fsS --max-time 120 -o $deb "{url}" && dpkg -i $deb' in bootstrap, role
        assert bootstrap.index("amazon-ssm-agent.deb") < bootstrap.index("/usr/local/sbin/orgmail-unbundle"), role
        assert 'log "warning: could not install the SSM agent' in bootstrap, role  # a warning, not an exit
        off = next(f.content for f in ROLES[role][1] if f.path == "/usr/local/sbin/orgmail-bootstrap")
        assert "amazon-ssm-agent" not in off, role


@pytest.mark.parametrize("role", ["mailbox", "edge"])
def test_postsrsd_is_asked_only_about_srs_addresses(role: str) -> None:
    """Every host that reverses SRS bounces puts srs-only.regexp before postsrsd's tcp: table, and ships it:
    ordinary mail never waits on postsrsd (booted: test_ordinary_mail_does_not_wait_on_postsrsd)."""
    from components.userdata import render_files, ssm_files
    from tests.unit.test_userdata import MAILBOX

    if role == "edge":
        by_path = {f.path: f.content for f in ROLES["edge"][1]}
    else:
        by_path = {f.path: f.content for f in render_files(MAILBOX)}
        by_path |= {path: spec["content"] for path, spec in ssm_files("mailbox").items()}
    maps = re.findall(r"^\w+_canonical_maps = (.+)$", by_path["/etc/postfix/main.cf"], re.M)
    # pipemap: the regexp passes on SRS addresses only; anything it maps is a valid recipient for smtpd, so it
    # must never map an ordinary address (to itself or otherwise): that accepted mail for unknown users.
    assert maps == ["pipemap:{regexp:/etc/postfix/srs-only.regexp, tcp:127.0.0.1:10002}"], maps
    table = by_path["/etc/postfix/srs-only.regexp"]
    rules = [line for line in table.splitlines() if line and not line.startswith("#")]
    assert rules == ["/^(srs[01][-+=].*)$/\t${1}"], rules
