"""Boot a rendered orgmail host under systemd-nspawn (docs/design.md, layer 3).

A cached Debian 13 root (scripts/e2e-rootfs.sh) is copied per boot, given a
NoCloud seed with the user-data under test and, optionally, a blank
loop-device disk that appears in the guest at the path Nitro gives an EBS
volume. The guest has its own network namespace with only loopback, made
before the boot and kept across restarts: probes and helper services (moto
for SSM and S3) run inside that namespace.

Test overrides, all in one place (the booted host differs from the AWS host
in these and only these):

* packages pre-installed (base dist-upgraded), apt lists kept, apt without
  retries, mail services ordered after cloud-config.service, fstab device
  entries mounted by a unit (systemd ignores them in a container),
  ``datasource_list: [NoCloud, None]``, resolv.conf at 127.0.0.1,
  openssh-server as on the AMI: made by scripts/e2e-rootfs.sh, see its header;
* the NoCloud seed in /var/lib/cloud/seed/nocloud instead of EC2's IMDS
  (:func:`boot_host`);
* the data volume is a loop device bound at
  ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…`` (:func:`ebs_by_id_path`);
* AWS endpoints: a moto server on the guest's loopback (:meth:`BootedHost.start_moto`),
  with dummy credentials (:data:`AWS_TEST_ENV`);
* extra /etc/hosts lines (``extra_hosts``), when a test asks for them;
* for the bare root (packages installed at boot): Debian's archive as a local
  mirror on the guest's loopback (:meth:`BootedHost.start_mirror`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ROOTFS_SCRIPT = REPO / "scripts" / "e2e-rootfs.sh"
CACHE = Path(os.environ.get("ORGMAIL_E2E_CACHE", "/var/cache/orgmail-e2e"))
ROOTFS = CACHE / "rootfs-trixie"
BARE_ROOTFS = CACHE / "rootfs-trixie-bare"  # without the host's packages; its mirror beside it (.mirror)
LOG_DIR = Path(os.environ.get("ORGMAIL_E2E_LOGS", str(CACHE / "logs")))

DEFAULT_VOLUME_ID = "vol-0123456789abcdef0"
SEED_DIR = "var/lib/cloud/seed/nocloud"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AWS_REGION = "eu-central-1"
AWS_TEST_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": AWS_REGION,
    "AWS_REGION": AWS_REGION,
}


class E2EError(RuntimeError):
    """The harness could not boot, reach or stop a guest."""


def ebs_by_id_path(volume_id: str = DEFAULT_VOLUME_ID) -> str:
    """The path under which a Nitro instance shows EBS volume ``volume_id``."""
    return "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_" + volume_id.replace("-", "")


def ensure_rootfs(bare: bool = False) -> Path:
    """Build the cached root if its package list changed; return its path.

    ``bare``: the root without the packages the user-data installs (as Debian's AMI), and beside it
    the mirror cloud-init installs them from at boot (:func:`start_mirror`)."""
    env = dict(os.environ)
    if bare:
        from components.userdata import COMMON_PACKAGES, MAILBOX_PACKAGES

        env["ORGMAIL_E2E_BARE"] = " ".join(COMMON_PACKAGES + MAILBOX_PACKAGES)
    out = subprocess.run(
        ["bash", str(ROOTFS_SCRIPT), str(BARE_ROOTFS if bare else ROOTFS)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=3600,
        env=env,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def missing_requirements() -> list[str]:
    """What this machine lacks to boot a guest (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "losetup", "ip"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


def require_e2e(also_missing: Sequence[str] = ()) -> None:
    """Skip the calling test when the machine cannot boot a guest (or lacks what else the test needs,
    ``also_missing``); fail under CI=true."""
    import pytest

    missing = [*missing_requirements(), *also_missing]
    if not missing:
        return
    reason = "e2e boot tests need " + ", ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


def _run(cmd: Sequence[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class BootedHost:
    """One guest: a root directory, an optional data disk, and the nspawn running it."""

    def __init__(self, root: Path, workdir: Path, name: str, disk: str | None, by_id: str | None) -> None:
        self.netns = f"/run/netns/{name}"  # made by boot_host; outlives restarts
        self.root = root
        self.workdir = workdir
        self.name = name
        self.disk = disk  # /dev/loopN on the host, or None
        self.by_id = by_id  # where the disk shows in the guest
        self.pid = 0  # the guest's systemd, as seen from the host
        self.boots = 0
        self.replacements = 0  # fresh roots booted by replace()
        self.extra_hosts: Mapping[str, str] = {}
        self.bare = False  # booted from the bare root (ensure_rootfs)
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._helpers: list[subprocess.Popen[bytes]] = []
        self._moto: dict[int, subprocess.Popen[bytes]] = {}

    # -- life cycle -------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Boot the guest and wait until its systemd runs."""
        self.boots += 1
        cmd = [
            "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
            f"--network-namespace-path={self.netns}", "--resolv-conf=off", "--link-journal=no",
            "--console=read-only", f"--machine={self.name}", f"--directory={self.root}",
            # nspawn grants network administration only with --private-network; the guest's
            # own namespace is just as private, and nftables and fail2ban need it.
            "--capability=CAP_NET_ADMIN",
        ]  # fmt: skip
        if self.disk and self.by_id:
            cmd += [
                f"--bind={self.disk}:{self.by_id}",
                f"--property=DeviceAllow={self.disk} rw",
            ]
        with open(self.workdir / f"console-{self.boots}.log", "wb") as console:
            self._nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise E2EError(f"systemd-nspawn exited with {self._nspawn.returncode}; see {console.name}")
            pids = [p for p in _children(self._nspawn.pid) if _comm(p) == "systemd"]
            if pids and self._ready(pids[0]):
                self.pid = pids[0]
                return
            time.sleep(0.1)
        raise E2EError(f"guest systemd did not start within {timeout}s")

    def _ready(self, pid: int) -> bool:
        probe = subprocess.run(
            ["nsenter", "-t", str(pid), "-a", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return probe.returncode == 0

    def stop(self, timeout: float = 60) -> None:
        """Power the guest off cleanly; kill it when that takes longer than ``timeout``.

        Helper services (moto) keep running: the network namespace outlives the guest.
        """
        proc = self._nspawn
        if proc is None:
            return
        if not self.pid:  # start() gave up early: find the guest's systemd all the same
            self.pid = next((p for p in _children(proc.pid) if _comm(p) == "systemd"), 0)
        if proc.poll() is None and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: poweroff
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"e2e: {self.name} did not power off in {timeout}s, killing it",
                    file=sys.stderr,
                )
        if proc.poll() is None:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._nspawn = None
        self.pid = 0

    def restart(self, timeout: float = 60) -> None:
        """Power off and boot again on the same root and data disk."""
        self.stop(timeout)
        self.start(timeout)

    def replace(self, timeout: float = 60) -> None:
        """What EC2 does on an instance replacement: power off, throw the root disk away, and boot a
        fresh copy of the cached root (a new instance id) with the same NoCloud seed and the same
        data disk. The network namespace and its helpers (moto) stay, as the VPC and AWS do."""
        self.stop(timeout)
        seed = self.root / SEED_DIR
        user_data = (seed / "user-data").read_bytes()
        meta = json.loads((seed / "meta-data").read_text())
        _discard_root(self.workdir)
        _make_root(ensure_rootfs(self.bare), self.workdir)
        self.replacements += 1
        meta["instance-id"] = f"i-{self.name}-r{self.replacements}"
        _seed_root(self.root, user_data, meta, self.extra_hosts)
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self._nspawn is not None and self._nspawn.poll() is None

    # -- inside the guest ------------------------------------------------

    def exec(
        self,
        cmd: Sequence[str],
        input: str | bytes | None = None,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in all the guest's namespaces, with a clean environment.

        Text in, text out (undecodable bytes replaced); ``check`` raises on a
        non-zero exit.
        """
        if not self.running:
            raise E2EError(f"{self.name} is not running")
        guest_env = {
            "PATH": GUEST_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            **(env or {}),
        }
        argv = ["nsenter", "-t", str(self.pid), "-a", "--", "/usr/bin/env", "-i"]
        argv += [f"{k}={v}" for k, v in guest_env.items()] + list(cmd)
        data = input.encode() if isinstance(input, str) else input
        raw = subprocess.run(argv, input=data, capture_output=True, timeout=timeout, check=False)
        result = subprocess.CompletedProcess(
            raw.args,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise E2EError(f"{list(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def listening_ports(self) -> set[int]:
        """The TCP ports something listens on in the guest."""
        out = self.exec(["ss", "-Hltn"]).stdout
        return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines()}

    def read_file(self, path: str) -> bytes:
        """Bytes of ``path`` as the guest sees it (its mounts included)."""
        if not self.running:
            raise E2EError(f"{self.name} is not running")
        return (Path(f"/proc/{self.pid}/root") / path.lstrip("/")).read_bytes()

    @contextlib.contextmanager
    def sync_paused(self) -> Iterator[None]:
        """orgmail-sync's timer stopped (and a running sync finished) while a test changes files that
        the sync owns: every 5 minutes it rewrites them from SSM and reloads their services, which
        would undo the test's change at a random moment. Started again afterwards."""
        self.exec(["systemctl", "stop", "orgmail-sync.timer"], check=True)
        deadline = time.monotonic() + 120
        while self.exec(["systemctl", "is-active", "--quiet", "orgmail-sync.service"]).returncode == 0:
            if time.monotonic() > deadline:
                raise E2EError("orgmail-sync.service still running after 120 s")
            time.sleep(1)
        try:
            yield
        finally:
            self.exec(["systemctl", "start", "orgmail-sync.timer"], check=True)

    def journal(self, unit: str | None = None, timeout: float = 60) -> str:
        """This boot's journal, of one unit or whole."""
        cmd = ["journalctl", "--no-pager", "-b", "-o", "short-monotonic"]
        if unit:
            cmd += ["-u", unit]
        return self.exec(cmd, timeout=timeout).stdout

    def wait_cloud_init(self, timeout: float = 300) -> dict[str, Any]:
        """Wait for cloud-init to finish; return its status.

        Keys: ``status`` ("done", "error", "degraded done", ...), ``errors``
        (list), ``recoverable_errors`` (dict of level to messages), ``detail``,
        ``result`` (/run/cloud-init/result.json), ``bootstrap`` (how orgmail's set-up
        ended its run, :meth:`wait_bootstrap`) and ``seconds`` (waited).
        """
        started = time.monotonic()
        try:
            res = self.exec(
                ["cloud-init", "status", "--wait", "--long", "--format", "json"],
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise E2EError(f"cloud-init not done within {timeout}s") from e
        try:
            status: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError as e:
            raise E2EError(f"cloud-init status said: {res.stdout}\n{res.stderr}") from e
        try:
            result = json.loads(self.read_file("/run/cloud-init/result.json"))
        except (OSError, json.JSONDecodeError):
            result = {}
        status["result"] = result
        status["bootstrap"] = self.wait_bootstrap(timeout=max(60.0, timeout - (time.monotonic() - started)))
        status["seconds"] = round(time.monotonic() - started, 1)
        return status

    def wait_bootstrap(self, timeout: float = 600) -> str:
        """Wait for orgmail's set-up at boot (orgmail-bootstrap.service, which cloud-init only starts)
        to end a run: "done" (its done-marker exists), "failed" (waiting to try again), or "none" (the
        user-data has no such unit)."""
        deadline = time.monotonic() + timeout
        while True:
            show = self.exec(["systemctl", "show", "-p", "LoadState,ActiveState,SubState",
                              "orgmail-bootstrap.service"]).stdout
            state = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
            finished = self.exec(["test", "-e", "/var/lib/orgmail/bootstrap.done"]).returncode == 0
            if finished and state.get("ActiveState") not in ("activating", "deactivating"):  # its report sent
                return "done"
            if state.get("LoadState") == "not-found":
                return "none"
            # Finished but its report (ExecStopPost) not spawned: systemd 257 in a container now and then
            # logs "Failed to spawn executor: No such file or directory" for it under load, and restarts
            # the unit, whose condition (the done-marker) then skips it. Wait for that, not "failed".
            if not finished and (state.get("SubState") == "auto-restart" or state.get("ActiveState") == "failed"):
                return "failed"
            if time.monotonic() > deadline:
                raise E2EError(f"orgmail-bootstrap still {state} after {timeout}s")
            time.sleep(1)

    def start_unit(self, unit: str) -> subprocess.CompletedProcess[str]:
        """`systemctl start unit`, once more if systemd could not spawn it: systemd 257 in a container now and
        then logs "Failed to spawn executor: No such file or directory" under load (see wait_bootstrap); the
        unit itself never ran. A unit that ran and failed is not started again."""
        res = self.exec(["systemctl", "start", unit])
        if res.returncode and "Failed to spawn executor" in "\n".join(self.journal(unit).splitlines()[-4:]):
            res = self.exec(["systemctl", "start", unit])
        return res

    def age_greylist_records(self, seconds: int, *, expect_some: bool = True) -> None:
        """Make every rspamd greylisting record (Redis keys rg*, holding the first attempt's time) `seconds`
        older, as if the sender's retry came that much later: rspamd's own check then passes it, no way
        around it. The records keep their expiry. Unless `expect_some` is false (one of several edges, of
        which another may have met the sender), there must be records to age."""
        res = self.exec(["sh", "-c", "for k in $(redis-cli --scan --pattern 'rg*'); do "
                                     f"redis-cli SET \"$k\" $(( $(redis-cli GET \"$k\") - {seconds} )) KEEPTTL; done"])
        assert res.returncode == 0 and set(res.stdout.split()) <= {"OK"}, res
        assert res.stdout.split() or not expect_some, f"no greylisting record on {self.name}"

    # -- helper services in the guest's network namespace -----------------

    def in_guest_net(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a host program (host filesystem, host Python) in the guest's network namespace.

        Works before :meth:`start` too: the namespace exists from :func:`boot_host` on.
        """
        argv = ["nsenter", f"--net={self.netns}", "--", *cmd]
        return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)

    def start_moto(self, port: int = 5000, timeout: float = 30) -> str:
        """Serve moto on the guest's 127.0.0.1:``port``; return its endpoint URL.

        Runs with the host's Python (the test venv), so moto must be installed
        there. Can be started before the guest boots (``before_boot`` of
        :func:`boot_host`), so the user-data finds it; survives :meth:`restart`.
        Calling it again for a port it already serves just returns the URL.
        """
        url = f"http://127.0.0.1:{port}"
        running = self._moto.get(port)
        if running is not None and running.poll() is None:
            return url
        with open(self.workdir / f"moto-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                ["nsenter", f"--net={self.netns}", "--",
                 sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._helpers.append(proc)
        self._moto[port] = proc
        probe = f"import urllib.request; urllib.request.urlopen('{url}/moto-api/', timeout=2)"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise E2EError(f"moto exited with {proc.returncode}; see {log.name}")
            if self.in_guest_net([sys.executable, "-c", probe], timeout=10).returncode == 0:
                return url
            time.sleep(0.3)
        raise E2EError(f"moto did not answer on {url} within {timeout}s; see {log.name}")

    def start_mirror(self, port: int = 80) -> Path:
        """Serve the bare root's Debian mirror (tests/e2e/mirror.py) on the guest's 127.0.0.1:``port``,
        where its /etc/hosts puts deb.debian.org; return the request log."""
        log = self.workdir / "mirror-requests.log"
        log.touch()
        with open(self.workdir / f"mirror-{port}.log", "wb") as out:
            proc = subprocess.Popen(
                ["nsenter", f"--net={self.netns}", "--", sys.executable, "-m", "tests.e2e.mirror",
                 f"{BARE_ROOTFS}.mirror", str(port), str(log)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO),
            )  # fmt: skip
        self._helpers.append(proc)
        probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/debian/dists/trixie/InRelease')"
        deadline = time.monotonic() + 30
        while self.in_guest_net([sys.executable, "-c", probe], timeout=10).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise E2EError(f"the mirror did not answer on port {port}; see {out.name}")
            time.sleep(0.3)
        return log

    def aws(self, endpoint: str, code: str, timeout: float = 60) -> str:
        """Run Python ``code`` with ``boto3`` imported and ``endpoint`` set, in the guest's network."""
        script = f"import boto3, json\nendpoint = {endpoint!r}\n{code}\n"
        # On stdin, not in argv: a stack's parameters in one script pass Linux's 128 KiB limit of one argument.
        res = self.in_guest_net(
            [sys.executable, "-"],
            input=script,
            timeout=timeout,
            env={**os.environ, **AWS_TEST_ENV},
        )
        if res.returncode != 0:
            raise E2EError(f"boto3 call failed:\n{res.stderr}")
        return res.stdout

    def put_ssm_parameter(self, endpoint: str, name: str, value: str, secure: bool = True) -> None:
        """Create or overwrite an SSM parameter (SecureString by default) in moto."""
        kind = "SecureString" if secure else "String"
        self.aws(
            endpoint,
            f"boto3.client('ssm', endpoint_url=endpoint).put_parameter("
            f"Name={name!r}, Value={value!r}, Type={kind!r}, Overwrite=True)",
        )

    def create_bucket(self, endpoint: str, bucket: str) -> None:
        """Create an S3 bucket in moto."""
        self.aws(
            endpoint,
            f"boto3.client('s3', endpoint_url=endpoint).create_bucket(Bucket={bucket!r}, "
            f"CreateBucketConfiguration={{'LocationConstraint': {AWS_REGION!r}}})",
        )

    def stop_helpers(self) -> None:
        """Stop the helper services started in the guest's network namespace."""
        for proc in self._helpers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self._helpers.clear()
        self._moto.clear()

    # -- debugging ----------------------------------------------------------

    def save_logs(self) -> Path:
        """Copy journal, cloud-init logs and console output to the log dir; return it."""
        dest = LOG_DIR / f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        if self.running:
            with contextlib.suppress(Exception):
                (dest / "journal.txt").write_text(self.journal(timeout=30))
            with contextlib.suppress(Exception):
                status = self.exec(["cloud-init", "status", "--long"], timeout=30)
                (dest / "cloud-init-status.txt").write_text(status.stdout + status.stderr)
        for rel in ("var/log/cloud-init.log", "var/log/cloud-init-output.log"):
            with contextlib.suppress(OSError):
                shutil.copy(self.root / rel, dest)
        for log in self.workdir.glob("*.log"):
            shutil.copy(log, dest)
        return dest


def _make_root(cached: Path, workdir: Path) -> bool:
    """Make ``workdir/root`` a writable copy of ``cached``; True when it is an overlay.

    An overlay (cached root as its lower layer) takes milliseconds where a
    full copy takes seconds; ORGMAIL_E2E_COPY=1 forces the copy.
    """
    root, upper, work = workdir / "root", workdir / "upper", workdir / "work"
    for d in (root, upper, work):
        d.mkdir()
    if not os.environ.get("ORGMAIL_E2E_COPY"):
        opts = f"lowerdir={cached},upperdir={upper},workdir={work}"
        mount = ["mount", "-t", "overlay", "overlay", "-o", opts, str(root)]
        if _run(mount, check=False).returncode == 0:
            return True
    _run(["cp", "-a", "--reflink=auto", f"{cached}/.", str(root)], timeout=600)
    return False


def _unmount_root(root: Path) -> bool:
    if root.is_mount():
        _run(["umount", str(root)], check=False)
        if root.is_mount():
            _run(["umount", "--lazy", str(root)], check=False)
    return not root.is_mount()


def _discard_root(workdir: Path) -> None:
    """Remove the guest's root (and its overlay layers), keeping the data disk and the logs."""
    root = workdir / "root"
    if not _unmount_root(root):
        raise E2EError(f"{root} is still mounted")
    for d in ("root", "upper", "work"):
        shutil.rmtree(workdir / d, ignore_errors=True)


def _seed_root(root: Path, user_data: bytes, meta: Mapping[str, Any], extra_hosts: Mapping[str, str]) -> None:
    seed = root / SEED_DIR
    seed.mkdir(parents=True)
    (seed / "user-data").write_bytes(user_data)
    (seed / "meta-data").write_text(json.dumps(meta, indent=2) + "\n")  # JSON is YAML
    if extra_hosts:
        with (root / "etc/hosts").open("a") as hosts:
            hosts.writelines(f"{addr} {host_name}\n" for host_name, addr in extra_hosts.items())


def _remove_workdir(workdir: Path) -> None:
    root = workdir / "root"
    if not _unmount_root(root):
        print(f"e2e: {root} still mounted, not removing {workdir}", file=sys.stderr)
        return
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def boot_host(
    user_data: bytes,
    *,
    meta_data: Mapping[str, Any] | None = None,
    data_disk_mb: int | None = 512,
    volume_id: str = DEFAULT_VOLUME_ID,
    name: str = "orgmail-e2e",
    extra_hosts: Mapping[str, str] | None = None,
    boot_timeout: float = 60,
    before_boot: Callable[[BootedHost], None] | None = None,
    bare: bool = False,
) -> Iterator[BootedHost]:
    """Boot a fresh copy of the cached root with ``user_data`` as its NoCloud seed.

    ``user_data`` goes to the seed as given (plain or gzip-compressed).
    ``meta_data`` is merged over ``instance-id`` and ``local-hostname``.
    With ``data_disk_mb``, a blank disk of that size shows in the guest at
    :func:`ebs_by_id_path` (``volume_id``). ``extra_hosts`` maps names to
    addresses for the guest's /etc/hosts. ``before_boot`` is called with the
    host before it boots, its network namespace (only ``lo``, up) already
    made: start moto and seed parameters there for the user-data to fetch.
    ``bare`` boots the root without the host's packages (:func:`ensure_rootfs`).
    On an exception the guest's logs
    are kept under :data:`LOG_DIR` (the path is printed); the copy, the disk
    and every process started are removed in all cases.
    """
    missing = missing_requirements()
    if missing:
        raise E2EError("cannot boot a guest without " + ", ".join(missing))
    cached = ensure_rootfs(bare)
    name = f"{name}-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=CACHE))
    root = workdir / "root"
    host: BootedHost | None = None
    disk: str | None = None
    netns = False
    try:
        _make_root(cached, workdir)
        meta = {"instance-id": f"i-{name}", "local-hostname": name, **(meta_data or {})}
        _seed_root(root, user_data, meta, extra_hosts or {})
        if data_disk_mb:
            image = workdir / "data-disk.img"
            with image.open("wb") as f:
                f.truncate(data_disk_mb * 1024 * 1024)
            disk = _run(["losetup", "--find", "--show", str(image)]).stdout.strip()
        _run(["ip", "netns", "add", name])
        netns = True
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        host = BootedHost(root, workdir, name, disk, ebs_by_id_path(volume_id) if disk else None)
        host.extra_hosts = dict(extra_hosts or {})
        host.bare = bare
        if before_boot is not None:
            before_boot(host)
        host.start(boot_timeout)
        yield host
    except BaseException:
        if host is not None:
            print(f"e2e: logs of failed boot {name}: {host.save_logs()}", file=sys.stderr)
        raise
    finally:
        if host is not None:
            # The guest is thrown away: no clean power-off to wait for (restart() and replace() keep theirs).
            host.stop(timeout=5)
            host.stop_helpers()
        if netns:
            _run(["ip", "netns", "delete", name], check=False)
        if disk:
            _run(["losetup", "-d", disk], check=False)
        if os.environ.get("ORGMAIL_E2E_KEEP"):
            print(f"e2e: kept {workdir} (umount {root} when done)", file=sys.stderr)
        else:
            _remove_workdir(workdir)
