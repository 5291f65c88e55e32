"""Layer 2: every rendered artefact through the real validator of the Debian 13 host.

Runs Debian 13's own cloud-init, postconf, doveconf, nft and fail2ban-client on the files the
program renders for every example stack, inside the cached Debian 13 root (chroot).
"""

from __future__ import annotations

import base64
import gzip
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e import harness
from tests.unit.conftest import STACKS, host_script, run_stack
from tests.unit.test_containment import enabled_jails
from tools.plan import host_files, user_data_text


@pytest.fixture(scope="module")
def root() -> Path:
    harness.require_e2e()
    return harness.ensure_rootfs()


@pytest.fixture
def workdir(root: Path) -> Iterator[tuple[Path, str]]:
    """A scratch directory inside the root: (host path, path as the chroot sees it)."""
    name = f"/tmp/orgmail-validate-{uuid.uuid4().hex[:8]}"
    host = root / name.lstrip("/")
    host.mkdir(parents=True)
    yield host, name
    shutil.rmtree(host, ignore_errors=True)


def chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True, timeout=120)


HOST_FILES: dict[str, dict[str, str]] = {}  # a host's user-data text: every file it gets


def all_user_data() -> list[tuple[str, str]]:
    out = []
    for stack in STACKS:
        run = run_stack(stack)
        for r in run.of_type("aws:ec2/instance:Instance"):
            text = user_data_text(r.inputs)
            HOST_FILES[text] = host_files(run, r)
            out.append((f"{stack}/{r.name}", text))
    return out


def files_of(user_data: str) -> dict[str, str]:
    """Every file the host gets: from user-data, its bundle and its role's files from SSM (tools.plan.host_files)."""
    return HOST_FILES[user_data]


USER_DATA = all_user_data()
IDS = [name for name, _ in USER_DATA]


@pytest.mark.parametrize(("name", "text"), USER_DATA, ids=IDS)
def test_cloud_init_schema(root: Path, workdir: tuple[Path, str], name: str, text: str) -> None:
    host, inside = workdir
    (host / "user-data").write_text(text)
    result = chroot(root, "cloud-init", "schema", "--config-file", f"{inside}/user-data")
    assert result.returncode == 0 and "Valid schema" in result.stdout, result.stdout + result.stderr


def test_schema_validator_catches_errors(root: Path, workdir: tuple[Path, str]) -> None:
    """The validator is live: a wrong type in a rendered user-data is reported."""
    host, inside = workdir
    broken = USER_DATA[0][1].replace("package_update: true", "package_update: sometimes")
    (host / "user-data").write_text(broken)
    result = chroot(root, "cloud-init", "schema", "--config-file", f"{inside}/user-data")
    assert result.returncode != 0


@pytest.mark.parametrize(("name", "text"), USER_DATA, ids=IDS)
def test_postfix_config(root: Path, workdir: tuple[Path, str], name: str, text: str) -> None:
    host, inside = workdir
    files = files_of(text)
    (host / "main.cf").write_text(files["/etc/postfix/main.cf"])
    (host / "master.cf").write_text(files["/etc/postfix/master.cf"])
    for flag in ("-n", "-M", "-P"):
        result = chroot(root, "postconf", "-c", inside, flag)
        assert result.returncode == 0 and result.stderr == "", f"postconf {flag}: {result.stderr}"


def test_postconf_reports_unknown_settings(root: Path, workdir: tuple[Path, str]) -> None:
    host, inside = workdir
    (host / "main.cf").write_text(files_of(USER_DATA[0][1])["/etc/postfix/main.cf"] + "smtpd_tls_protocolz = x\n")
    (host / "master.cf").write_text(files_of(USER_DATA[0][1])["/etc/postfix/master.cf"])
    assert "smtpd_tls_protocolz" in chroot(root, "postconf", "-c", inside, "-n").stderr


@pytest.mark.parametrize(("name", "text"), [u for u in USER_DATA if "ROLE=mailbox" in u[1]],
                         ids=[n for n, t in USER_DATA if "ROLE=mailbox" in t])
def test_dovecot_config(root: Path, workdir: tuple[Path, str], name: str, text: str) -> None:
    host, inside = workdir
    (host / "dovecot.conf").write_text(files_of(text)["/etc/dovecot/dovecot.conf"])
    result = chroot(root, "doveconf", "-c", f"{inside}/dovecot.conf", "-n")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "ssl = required" in result.stdout


def test_dovecot_config_with_shared_mailboxes(root: Path, workdir: tuple[Path, str]) -> None:
    """doveconf on the medium example's mailbox host with what orgmail-sync writes for its shared mailbox."""
    from components.secrets import host_config
    from components.settings import load_settings
    from tests.unit.conftest import raw_config

    host, inside = workdir
    text = next(t for n, t in USER_DATA if n.startswith("medium/") and "ROLE=mailbox" in t)
    conf = files_of(text)["/etc/dovecot/dovecot.conf"]
    assert "\n!include_try /etc/dovecot/orgmail-shared.conf\n" in conf
    (host / "dovecot.conf").write_text(conf.replace("/etc/dovecot/orgmail-shared.conf", f"{inside}/orgmail-shared.conf"))
    shared = host_script("sync.py").shared_namespaces(host_config(load_settings(raw_config("medium"), "medium"))["mailboxes"])
    (host / "orgmail-shared.conf").write_text(shared)
    result = chroot(root, "doveconf", "-c", f"{inside}/dovecot.conf", "-n")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert 'namespace Shared/office@medium.example {' in result.stdout or \
        'namespace "Shared/office@medium.example" {' in result.stdout, result.stdout
    assert re.search(r"^mail_plugins \{\n(  \w+ = yes\n)*  acl = yes\n", result.stdout, re.M), result.stdout
    # include_try forgives a missing file, never a broken one.
    (host / "orgmail-shared.conf").write_text(shared.replace("rights = ", "rightz = "))
    assert chroot(root, "doveconf", "-c", f"{inside}/dovecot.conf", "-n").returncode != 0


def test_doveconf_rejects_2_3_syntax(root: Path, workdir: tuple[Path, str]) -> None:
    host, inside = workdir
    conf = files_of(USER_DATA[0][1])["/etc/dovecot/dovecot.conf"] + "disable_plaintext_auth = yes\n"
    (host / "dovecot.conf").write_text(conf)
    assert chroot(root, "doveconf", "-c", f"{inside}/dovecot.conf", "-n").returncode != 0


@pytest.mark.parametrize(("name", "text"), USER_DATA, ids=IDS)
def test_fail2ban_config(root: Path, workdir: tuple[Path, str], name: str, text: str) -> None:
    host, inside = workdir
    shutil.copytree(root / "etc/fail2ban", host / "fail2ban")
    written = {p: c for p, c in files_of(text).items() if p.startswith("/etc/fail2ban/")}
    for path, content in written.items():
        (host / "fail2ban" / path.removeprefix("/etc/fail2ban/")).write_text(content)
    assert "/etc/fail2ban/filter.d/postfix.local" in written
    # fail2ban refuses to start at all when an enabled jail's log file is missing: every file a jail
    # reads that no package brings must be made at boot by the host's own tmpfiles.d (the bootstrap
    # applies it before fail2ban starts). Here it is made in the scratch directory instead.
    made = {line.split()[1] for p, c in files_of(text).items() if p.startswith("/etc/tmpfiles.d/")
            for line in c.splitlines() if line.startswith("f ")}
    jail = host / "fail2ban/jail.local"
    jail_text = jail.read_text()
    for path in (s["logpath"] for s in enabled_jails(jail_text).values() if "logpath" in s):
        if (root / path.lstrip("/")).exists():
            continue
        assert path in made, f"{path}: read by a jail, made by no tmpfiles.d file of the host"
        (host / "logs" / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (host / "logs" / path.lstrip("/")).touch()
        jail_text = jail_text.replace(f"logpath = {path}\n", f"logpath = {inside}/logs{path}\n")
    jail.write_text(jail_text)
    result = chroot(root, "fail2ban-client", "-c", f"{inside}/fail2ban", "-t")
    assert result.returncode == 0, result.stdout + result.stderr


RECEIVED = ("Received: from anns-laptop.home.lan (home.example.net [198.51.100.7])\n\t(using TLSv1.3 with cipher "
            "TLS_AES_256_GCM_SHA384 (256/256 bits))\n\t(No client certificate requested)\n\tby mail.example.org "
            "(Postfix) with ESMTPSA id 4dLqH10Z2Wz9sTq\n\tfor <bob@example.org>; Tue,  2 Dec 2025 03:00:00 +0000 (UTC)")


def test_submission_received_header_hides_the_client(root: Path, workdir: tuple[Path, str]) -> None:
    host, inside = workdir
    files = files_of(USER_DATA[0][1])
    (host / "checks").write_text(files["/etc/postfix/submission_header_checks"])
    (host / "main.cf").write_text(files["/etc/postfix/main.cf"])  # postmap reads a main.cf; the root has none
    result = chroot(root, "postmap", "-c", inside, "-q", RECEIVED, f"regexp:{inside}/checks")
    assert result.stdout.startswith("REPLACE Received: by mail.example.org (Postfix) with ESMTPSA id 4dLqH10Z2Wz9sTq"), result
    assert "198.51.100.7" not in result.stdout and "anns-laptop" not in result.stdout
    inbound = RECEIVED.replace("ESMTPSA", "ESMTPS")  # port 25: not authenticated, kept whole
    assert chroot(root, "postmap", "-c", inside, "-q", inbound, f"regexp:{inside}/checks").returncode == 1


def test_sync_script_compiles_on_the_hosts_python(root: Path, workdir: tuple[Path, str]) -> None:
    host, inside = workdir
    (host / "sync.py").write_text(files_of(USER_DATA[0][1])["/usr/local/sbin/orgmail-sync"])
    result = chroot(root, "python3", "-m", "py_compile", f"{inside}/sync.py")
    assert result.returncode == 0, result.stderr



def test_sieve_scripts_compile_as_orgmail_sync_compiles_them(root: Path, workdir: tuple[Path, str]) -> None:
    """Debian's sievec, the rendered dovecot.conf and orgmail-sync's arguments: every global script
    compiles, the learning scripts with the extensions only global scripts get (pipe, environment)."""
    host, inside = workdir
    files = files_of(next(text for _, text in USER_DATA if "ROLE=mailbox" in text))
    # The root has no vmail user (orgmail-bootstrap makes it before orgmail-sync compiles).
    conf = files["/etc/dovecot/dovecot.conf"]
    assert "mail_uid = vmail\nmail_gid = vmail\n" in conf
    (host / "dovecot.conf").write_text(conf.replace("mail_uid = vmail\nmail_gid = vmail\n", ""))
    found = re.search(r'^SIEVE_GLOBAL_EXTENSIONS = "(.*)"$', files["/usr/local/sbin/orgmail-sync"], re.M)
    assert found
    scripts = sorted(p for p in files if p.startswith("/etc/dovecot/sieve/") and p.endswith(".sieve"))
    assert [p.rsplit("/", 1)[1] for p in scripts] == ["learn-ham.sieve", "learn-spam.sieve", "spam-to-junk.sieve"]
    for path in scripts:
        name = path.rsplit("/", 1)[1]
        (host / name).write_text(files[path])
        compiled = chroot(root, "sievec", "-c", f"{inside}/dovecot.conf", "-x", found[1], f"{inside}/{name}")
        assert compiled.returncode == 0 and (host / name).with_suffix(".svbin").exists(), compiled.stderr


@pytest.mark.parametrize("cidrs", [[], ["203.0.113.0/24"], ["2001:db8::/48"], ["203.0.113.0/24", "198.51.100.0/24",
                                                                               "2001:db8::/48"]])
def test_nftables_loads_with_the_ssh_sets_orgmail_sync_writes(root: Path, workdir: tuple[Path, str],
                                                              cidrs: list[str]) -> None:
    """admin.sshCidrs is a day-2 setting: nftables.conf (user-data) includes the sets orgmail-sync writes;
    Debian's nft accepts the pair, and the file alone (before the first sync) too."""
    from tests.unit.test_rate_limits import sync_module

    host, inside = workdir
    for name, text in USER_DATA:
        conf = files_of(text)["/etc/nftables.conf"].replace("/etc/orgmail/nftables.d", f"{inside}/nft.d")
        (host / "nftables.conf").write_text(conf)
        shutil.rmtree(host / "nft.d", ignore_errors=True)
        result = chroot(root, "nft", "-c", "-f", f"{inside}/nftables.conf")
        assert result.returncode == 0, (name, result.stderr)
        (host / "nft.d").mkdir()
        (host / "nft.d" / "ssh.nft").write_text(sync_module().ssh_sets(cidrs))
        result = chroot(root, "nft", "-c", "-f", f"{inside}/nftables.conf")
        assert result.returncode == 0, (name, cidrs, result.stderr)


# --- the ISP cluster's roles: every file each role renders, through the same validators ---------------------

def cluster_hosts() -> dict[str, dict[str, str]]:
    """Each cluster role's files as the isp example plans them: the edges' launch template, a shard's and
    a relay's instance, each with its role's bundle from the planned SSM parameters, joined and checked by the
    host's own orgmail-unbundle against the SHA-256 its user-data names."""
    run = run_stack("isp")
    out: dict[str, dict[str, str]] = {}
    [template] = run.of_type("aws:ec2/launchTemplate:LaunchTemplate")
    docs = {"edge": gzip.decompress(base64.b64decode(template.inputs["userData"])).decode()}
    for r in run.of_type("aws:ec2/instance:Instance"):
        role = "shard" if r.name.startswith("shard") else "relay"
        docs.setdefault(role, user_data_text(r.inputs))
    parameters = [{"Name": p.inputs["name"], "Value": p.inputs["value"]} for p in run.of_type("aws:ssm/parameter:Parameter")]
    for role, text in docs.items():
        out[role] = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
        [sha] = re.findall(r"^BUNDLE_SHA256=([0-9a-f]{64})$", out[role]["/etc/orgmail/host.env"], re.M)
        mine = [p for p in parameters if p["Name"].startswith(f"/orgmail/isp/{role}/bundle/")]
        bundle = UNBUNDLE.verified(UNBUNDLE.joined(mine, f"/orgmail/isp/{role}/bundle"), sha)
        out[role] |= {path: spec["content"] for path, spec in bundle.items()}
        out[role]["user-data"] = text
    return out


UNBUNDLE = host_script("unbundle.py")


CLUSTER = cluster_hosts()
# What orgmail-bootstrap writes from SSM at boot (a sample login: the host checks the real one's shape).
DIRECTORY_LOGIN = ("db.abc123.eu-west-1.rds.amazonaws.com", "orgmail_edge", "Sample0Password0Only0")


@pytest.mark.parametrize("role", sorted(CLUSTER))
def test_cluster_cloud_init_schema(root: Path, workdir: tuple[Path, str], role: str) -> None:
    host, inside = workdir
    (host / "user-data").write_text(CLUSTER[role]["user-data"])
    result = chroot(root, "cloud-init", "schema", "--config-file", f"{inside}/user-data")
    assert result.returncode == 0 and "Valid schema" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("role", ["edge", "relay"])
def test_cluster_postfix_config(root: Path, workdir: tuple[Path, str], role: str) -> None:
    """postconf reads main.cf, master.cf and (the edge) every proxy:pgsql map file as orgmail-bootstrap
    completes it: an unknown parameter anywhere is a warning on stderr."""
    host, inside = workdir
    files = CLUSTER[role]
    main = files["/etc/postfix/main.cf"]
    master = files["/etc/postfix/master.cf"]
    maps = {p: c for p, c in files.items() if p.endswith(".cf.in")}
    assert bool(maps) == (role == "edge")
    for path, content in maps.items():
        name = path.rsplit("/", 1)[1].removesuffix(".in")
        db_host, user, password = DIRECTORY_LOGIN
        (host / name).write_text(f"hosts = {db_host}\nuser = {user}\npassword = {password}\n" + content)
        main = main.replace(path.removesuffix(".in"), f"{inside}/{name}")
        master = master.replace(path.removesuffix(".in"), f"{inside}/{name}")  # the submission services' maps
    (host / "main.cf").write_text(main)
    (host / "master.cf").write_text(master)
    for flag in ("-n", "-M", "-P"):
        result = chroot(root, "postconf", "-c", inside, flag)
        assert result.returncode == 0 and result.stderr == "", f"postconf {flag}: {result.stderr}"
    effective = chroot(root, "postconf", "-c", inside, "-h", "mynetworks", "inet_protocols").stdout.split("\n")
    assert effective[1] == "ipv4"
    if role == "edge":
        proxied = chroot(root, "postconf", "-c", inside, "-h", "postscreen_upstream_proxy_protocol",
                         "smtpd_upstream_proxy_protocol", "import_environment").stdout.split("\n")
        # postscreen on 25; smtpd behind it takes the client from postscreen, so not in main.cf
        assert proxied[:2] == ["haproxy", ""] and proxied[2].endswith(
            " PGSSLMODE=verify-full PGSSLROOTCERT=/etc/orgmail/directory-ca.pem")
        services = chroot(root, "postconf", "-c", inside, "-P").stdout.splitlines()
        for service in ("submission", "submissions"):
            assert f"{service}/inet/smtpd_upstream_proxy_protocol = haproxy" in services, services
    else:
        assert effective[0].split()[1:] == [f"10.42.{10 + n}.0/24" for n in (1, 2)]


def test_cluster_postconf_sees_a_bad_map_parameter(root: Path, workdir: tuple[Path, str]) -> None:
    """The map check above is live: a misspelt parameter in a pgsql map file is reported."""
    host, inside = workdir
    files = CLUSTER["edge"]
    path = "/etc/postfix/orgmail/pgsql/virtual_alias_maps.cf"
    (host / "map.cf").write_text(files[path + ".in"] + "hostz = x\n")
    (host / "main.cf").write_text(files["/etc/postfix/main.cf"].replace(path, f"{inside}/map.cf"))
    (host / "master.cf").write_text(files["/etc/postfix/master.cf"])
    assert "hostz" in chroot(root, "postconf", "-c", inside, "-n").stderr


@pytest.mark.parametrize("role", ["edge", "shard"])
def test_cluster_dovecot_config(root: Path, workdir: tuple[Path, str], role: str) -> None:
    """doveconf on the rendered dovecot.conf with the directory block (and the shard's doveadm secret) that
    orgmail-bootstrap writes from SSM."""
    host, inside = workdir
    db_host, user, password = DIRECTORY_LOGIN
    (host / "directory.conf").write_text(
        f"pgsql {db_host} {{\n  parameters {{\n    dbname = orgmail\n    user = {user}\n"
        f"    password = {password}\n    sslmode = verify-full\n    sslrootcert = /etc/orgmail/directory-ca.pem\n  }}\n}}\n")
    (host / "doveadm.conf").write_text("doveadm_password = sample\n")
    conf = (CLUSTER[role]["/etc/dovecot/dovecot.conf"]
            .replace("/etc/dovecot/orgmail-directory.conf", f"{inside}/directory.conf")
            .replace("/etc/dovecot/orgmail-doveadm.conf", f"{inside}/doveadm.conf"))
    (host / "dovecot.conf").write_text(conf)
    result = chroot(root, "doveconf", "-c", f"{inside}/dovecot.conf", "-n")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert f"pgsql {db_host} {{" in out and "sslmode = verify-full" in out and "sslrootcert = " in out
    if role == "edge":
        assert "haproxy_trusted_networks = 10.42.0.0/27 10.42.0.32/27" in out and "lmtp_proxy = yes" in out
        assert out.count("haproxy = yes") == 2
    else:
        assert "login_trusted_networks = 10.42.11.0/24 10.42.12.0/24" in out
        assert "doveadm_password = # hidden" in out or "doveadm_password" in out
        for port in (24, 110, 143, 24245):
            assert f"port = {port}\n" in out, port


@pytest.mark.parametrize("role", sorted(CLUSTER))
def test_cluster_nftables(root: Path, workdir: tuple[Path, str], role: str) -> None:
    host, inside = workdir
    conf = CLUSTER[role]["/etc/nftables.conf"].replace("/etc/orgmail/nftables.d", f"{inside}/nft.d")
    (host / "nftables.conf").write_text(conf)
    result = chroot(root, "nft", "-c", "-f", f"{inside}/nftables.conf")
    assert result.returncode == 0, result.stderr


def test_cluster_edge_fail2ban(root: Path, workdir: tuple[Path, str]) -> None:
    """The edge's jails and its Postfix ban action (the only role with fail2ban: shards and relays see
    only the stack's own hosts)."""
    host, inside = workdir
    files = CLUSTER["edge"]
    assert not any(p.startswith("/etc/fail2ban/") for p in CLUSTER["shard"] | CLUSTER["relay"])
    shutil.copytree(root / "etc/fail2ban", host / "fail2ban")
    for path, content in files.items():
        if path.startswith("/etc/fail2ban/"):
            (host / "fail2ban" / path.removeprefix("/etc/fail2ban/")).write_text(content)
    log = "/var/log/dovecot/login-failures.log"
    (host / "logs" / log.lstrip("/")).parent.mkdir(parents=True)
    (host / "logs" / log.lstrip("/")).touch()
    jail = host / "fail2ban/jail.local"
    jail.write_text(jail.read_text().replace(f"logpath = {log}\n", f"logpath = {inside}/logs{log}\n"))
    result = chroot(root, "fail2ban-client", "-c", f"{inside}/fail2ban", "-t")
    assert result.returncode == 0, result.stdout + result.stderr
    dumped = chroot(root, "fail2ban-client", "-c", f"{inside}/fail2ban", "-d").stdout
    assert "orgmail-postfix-ban" in dumped and "nftables" not in dumped


EDGE_RSPAMD_RUN = r"""
set -e
ip link set lo up
install -d -o _rspamd -g _rspamd {w}/run {w}/db {w}/log
rspamd -c {w}/rspamd/rspamd.conf --var=CONFDIR={w}/rspamd --var=LOCAL_CONFDIR={w}/rspamd --var=RUNDIR={w}/run \
  --var=DBDIR={w}/db --var=LOGDIR={w}/log -u _rspamd -g _rspamd
scan() {{ rspamc -h 127.0.0.1:11333 --user ann@example.org --from ann@example.org --rcpt x@outside.example \
  {w}/$1.eml 2>&1 | grep -E '^Action|smtp_message' | tr '\n' ' '; echo; }}
for i in $(seq 120); do scan own | grep -q Action && break; sleep 1; done
echo "no map, own => $(scan own)"
printf 'ann@example.org ann@example.org\nsales@example.org ann@example.org,bob@example.org\n' >{w}/senders.new
mv {w}/senders.new {w}/senders
for i in $(seq 30); do scan own | grep -q 'no action' && break; sleep 1; done
for m in own alias other display; do echo "map, $m => $(scan $m)"; done
kill $(cat {w}/run/rspamd.pid)
"""


def test_cluster_edge_rspamd_checks_from_against_the_exported_map(root: Path, workdir: tuple[Path, str]) -> None:
    """The edge's rspamd (its rendered local.d files and orgmail_from.lua, from the isp plan) loads
    (configtest) and, run in the root (its own network namespace, no boot), judges authenticated mail by the map
    orgmail-senders writes: no map yet is a soft reject (4xx), the map is read when it appears, and a From: the
    login may not use is refused. Test overrides: paths under the scratch directory, and the normal worker on
    11333 for rspamc (on the edge only the milter proxy listens, for Postfix)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    host, inside = workdir
    files = CLUSTER["edge"]
    shutil.copytree(root / "etc/rspamd", host / "rspamd")
    rspamd_files = {p: c for p, c in files.items() if p.startswith("/etc/rspamd/")}
    assert "/etc/rspamd/lua.local.d/orgmail_from.lua" in rspamd_files
    for path, content in rspamd_files.items():
        target = host / "rspamd" / path.removeprefix("/etc/rspamd/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content.replace("/etc/postfix/orgmail/senders", f"{inside}/senders")
                          .replace("/etc/rspamd/orgmail/", f"{inside}/rspamd/orgmail/"))
    test = chroot(root, "rspamadm", f"--var=CONFDIR={inside}/rspamd", f"--var=LOCAL_CONFDIR={inside}/rspamd",
                  "configtest", "-c", f"{inside}/rspamd/rspamd.conf")
    assert test.returncode == 0 and "syntax OK" in test.stdout, test.stdout + test.stderr
    (host / "rspamd/local.d/worker-normal.inc").write_text('bind_socket = "127.0.0.1:11333";\n')
    for name, sender in (("own", "ann@example.org"), ("alias", "Sales <sales@example.org>"),
                         ("other", "bob@example.org"), ("display", '"bob@example.org" <ann@example.org>')):
        (host / f"{name}.eml").write_text(
            f"From: {sender}\r\nTo: x@outside.example\r\nSubject: t\r\nMessage-ID: <{name}@example.org>\r\n"
            "Date: Thu, 03 Dec 2026 16:00:00 +0000\r\n\r\nhello\r\n")
    (host / "run.sh").write_text(EDGE_RSPAMD_RUN.format(w=inside))
    run = subprocess.run(["unshare", "--net", "--mount", "--fork", "sh", "-c",
                          f"mount -t proc proc {root}/proc && mount --bind /dev {root}/dev && "
                          f"chroot {root} sh {inside}/run.sh"], capture_output=True, text=True, timeout=300)
    out = dict(line.split(" => ", 1) for line in run.stdout.splitlines() if " => " in line)
    assert "Action: soft reject" in out.get("no map, own", ""), run.stdout + run.stderr
    assert "Sender addresses not loaded yet" in out["no map, own"]
    assert out["map, own"].startswith("Action: no action"), out
    assert out["map, alias"].startswith("Action: no action"), out
    assert out["map, other"].startswith("Action: reject") and "From: bob@example.org is not an address" in out["map, other"]
    assert out["map, display"].startswith("Action: reject"), out


def test_cluster_edge_sender_export_runs_on_the_hosts_python_and_libpq(root: Path, workdir: tuple[Path, str]) -> None:
    """orgmail-senders as the edge gets it, on Debian 13's python3 and the libpq5 that postfix-pgsql brings (through
    ctypes): a directory that does not answer is an error naming it, exit 1, and the last map stays."""
    host, inside = workdir
    script = CLUSTER["edge"]["/usr/local/sbin/orgmail-senders"]
    (host / "senders.py").write_text(script)
    # Its directory client beside it (on the edge in /usr/local/lib/orgmail, which it also looks in).
    (host / "orgmail_libpq.py").write_text(CLUSTER["edge"]["/usr/local/lib/orgmail/orgmail_libpq.py"])
    db_host, user, password = DIRECTORY_LOGIN
    (host / "login.cf").write_text(f"hosts = {inside}/nosocket\nuser = {user}\npassword = {password}\n"
                                   + CLUSTER["edge"]["/etc/postfix/orgmail/pgsql/smtpd_sender_login_maps.cf.in"])
    (host / "senders.sql").write_text(CLUSTER["edge"]["/etc/orgmail/senders.sql"])
    (host / "senders").write_text("ann@example.org ann@example.org\n")
    result = chroot(root, "python3", "-c", f"import sys; sys.path.insert(0, '{inside}'); import senders; "
                    f"sys.exit(senders.main('{inside}/login.cf', '{inside}/senders.sql', '{inside}/senders'))")
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(rf"orgmail-senders: directory: connection to server on socket \"{inside}/nosocket/.s.PGSQL.5432\" "
                     rf"failed: .*; {inside}/senders left as it was", result.stderr), result.stderr
    assert (host / "senders").read_text() == "ann@example.org ann@example.org\n"


def test_cluster_edge_sender_export_units(root: Path, workdir: tuple[Path, str]) -> None:
    """systemd-analyze verify on orgmail-senders' service and timer as the edge gets them (an unknown or
    misspelt setting is a warning on stderr); the script at its path in the scratch directory."""
    host, inside = workdir
    files = CLUSTER["edge"]
    (host / "orgmail-senders").write_text(files["/usr/local/sbin/orgmail-senders"])
    (host / "orgmail-senders").chmod(0o755)
    for unit in ("orgmail-senders.service", "orgmail-senders.timer"):
        (host / unit).write_text(files[f"/etc/systemd/system/{unit}"].replace(
            "/usr/local/sbin/orgmail-senders", f"{inside}/orgmail-senders"))
    result = chroot(root, "systemd-analyze", "verify", f"{inside}/orgmail-senders.service",
                    f"{inside}/orgmail-senders.timer")
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("role", ["edge", "shard"])
def test_cluster_auth_cache_flusher_unit_and_script(root: Path, workdir: tuple[Path, str], role: str) -> None:
    """orgmail-authflush as each role gets it: systemd-analyze verify on its unit, and the script on Debian 13's
    python3 and libpq5, which reads Dovecot's directory login and names a file it cannot read (exit 1)."""
    host, inside = workdir
    files = CLUSTER[role]
    (host / "orgmail-authflush").write_text(files["/usr/local/sbin/orgmail-authflush"])
    (host / "orgmail-authflush").chmod(0o755)
    (host / "orgmail_libpq.py").write_text(files["/usr/local/lib/orgmail/orgmail_libpq.py"])
    (host / "orgmail-authflush.service").write_text(files["/etc/systemd/system/orgmail-authflush.service"].replace(
        "/usr/local/sbin/orgmail-authflush", f"{inside}/orgmail-authflush"))
    result = chroot(root, "systemd-analyze", "verify", f"{inside}/orgmail-authflush.service")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    result = chroot(root, "python3", f"{inside}/orgmail-authflush")
    assert result.returncode == 1 and "cannot read the directory login" in result.stderr, result.stderr
    (host / "login.conf").write_text("pgsql db.internal {\n  parameters {\n    dbname = orgmail\n    user = u\n"
                                     "    password = p\n  }\n}\n")
    code = (f"import importlib.machinery as m, importlib.util as u; l = m.SourceFileLoader('f', '{inside}/orgmail-authflush'); "
            "f = u.module_from_spec(u.spec_from_loader('f', l)); l.exec_module(f); "
            f"print(f.login_info(open('{inside}/login.conf').read()))")
    result = chroot(root, "python3", "-c", code)
    assert result.returncode == 0 and result.stdout.startswith("host='db.internal' user='u'"), result.stderr


# --- webmail (orgmail:webmail): Debian 13's nginx, PHP and Python on what the mailbox host gets -------------


def mailbox_files() -> dict[str, str]:
    from components.userdata import ssm_files

    return {path: spec["content"] for path, spec in ssm_files("mailbox").items()}


def test_nginx_takes_the_webmail_site(root: Path, workdir: tuple[Path, str]) -> None:
    host, inside = workdir
    (host / "site.conf").write_text(mailbox_files()["/etc/orgmail/webmail/nginx-site.conf"])
    # Relative includes (the site's snippets/fastcgi-php.conf, and its fastcgi.conf) are read beside the
    # main file: Debian's own, as on the host.
    for name in ("snippets", "fastcgi.conf"):
        (host / name).symlink_to(f"/etc/nginx/{name}")
    (host / "nginx.conf").write_text("events {}\nhttp {\n  include /etc/nginx/mime.types;\n"
                                     f"  include {inside}/site.conf;\n}}\n")
    result = chroot(root, "nginx", "-t", "-c", f"{inside}/nginx.conf")
    assert result.returncode == 0, result.stderr
    (host / "site.conf").write_text(mailbox_files()["/etc/orgmail/webmail/nginx-site.conf"].replace("listen", "lisen"))
    assert chroot(root, "nginx", "-t", "-c", f"{inside}/nginx.conf").returncode != 0  # the validator does catch


def test_php_parses_roundcubes_settings_and_the_plugin(root: Path, workdir: tuple[Path, str]) -> None:
    host, inside = workdir
    sync = host_script("sync.py")
    files = mailbox_files()
    written = {
        "orgmail.inc.php": files["/etc/orgmail/webmail/roundcube.inc.php"],
        "plugin.php": files["/etc/orgmail/webmail/orgmail_password/orgmail_password.php"],
        "config.inc.php": sync.roundcube_config({"productName": "O'Brien & Co Mail", "requirePasswordChange": True},
                                                "mail.example.org", "abcdefghijklmnopqrstuvwx"),
    }
    for name, text in written.items():
        (host / name).write_text(text)
        result = chroot(root, "php", "-l", f"{inside}/{name}")
        assert result.returncode == 0, (name, result.stdout, result.stderr)
    # Evaluated as Roundcube does: the settings it gets are the ones meant.
    (host / "config.inc.php").write_text(written["config.inc.php"].replace("/etc/orgmail/webmail/roundcube.inc.php",
                                                                          f"{inside}/orgmail.inc.php"))
    probe = (f"include '{inside}/config.inc.php'; echo json_encode([$config['imap_host'], $config['product_name'], "
             "$config['imap_conn_options']['ssl']['peer_name'], $config['password_driver'], $config['plugins']]);")
    out = chroot(root, "php", "-r", probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ('["ssl:\\/\\/127.0.0.1:993","O\'Brien & Co Mail","mail.example.org","httpapi",'
                          '["archive","zipdownload","managesieve","password","orgmail_password"]]')
    (host / "broken.php").write_text("<?php $config['x'] = ;\n")
    assert chroot(root, "php", "-l", f"{inside}/broken.php").returncode != 0


def test_the_webmail_units_and_orgmail_passwd_pass_systemd_and_python(root: Path, workdir: tuple[Path, str]) -> None:
    host, inside = workdir
    files = mailbox_files()
    (host / "passwd.py").write_text(files["/usr/local/sbin/orgmail-passwd"])
    result = chroot(root, "python3", "-m", "py_compile", f"{inside}/passwd.py")
    assert result.returncode == 0, result.stderr
    units = [p for p in files if p.startswith("/etc/systemd/system/orgmail-") and ("passwd" in p or "tunnel" in p)]
    assert len(units) == 3
    # The programs they start are made by the host (cloudflared) or are its files: stand-ins in the scratch
    # directory, which systemd-analyze finds (the cached root is never written to).
    programs = {"/usr/local/sbin/orgmail-passwd": f"{inside}/orgmail-passwd",
                "/usr/local/bin/cloudflared": f"{inside}/cloudflared"}
    for stand_in in programs.values():
        (host / Path(stand_in).name).write_text("#!/bin/sh\n")
        (host / Path(stand_in).name).chmod(0o755)
    for path in units:
        text = files[path]
        for program, stand_in in programs.items():
            text = text.replace(program, stand_in)
        (host / Path(path).name).write_text(text)
    result = chroot(root, "systemd-analyze", "verify", *(f"{inside}/{Path(p).name}" for p in units
                                                          if not p.endswith("@.service")))
    assert result.returncode == 0, result.stdout + result.stderr
