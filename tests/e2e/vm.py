"""A real kernel for the one step systemd-nspawn cannot show: growing a mounted ext4 file system.

The booted-host tests run under systemd-nspawn, whose processes lack CAP_SYS_RESOURCE on this kind of
machine (the capability bounding set of every process), so the kernel refuses ext4's online resize
(EXT4_IOC_RESIZE_FS) there. This module boots Debian's kernel under QEMU (software emulation) with the cached bare Debian 13 root as its initramfs and the host's `orgmail-volume` script,
and attaches a virtio disk as the mail volume. The guest's init (INIT below) runs `orgmail-volume
prepare` on the blank disk, reports, waits until the disk grows (QMP `block_resize`, as EBS grows a
volume under a running instance), then runs `orgmail-volume grow` and reports again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import CACHE, ensure_rootfs

REPO = Path(__file__).resolve().parents[2]
VOLUME_SCRIPT = REPO / "cloud-init" / "files" / "orgmail" / "volume.py"
KERNEL_DIR = CACHE / "vm-kernel"
QEMU = "qemu-system-x86_64"
# Left out of the initramfs: documentation and caches nothing here reads.
SKIP = ("usr/share", "var", "usr/lib/python3", "usr/lib/x86_64-linux-gnu/perl", "usr/include", "usr/src")
# The kernel modules the VM loads, with what they depend on (the rest of the 6.1 tree is 400 MB).
MODULES = ("kernel/drivers/virtio", "kernel/drivers/block/virtio_blk.ko", "kernel/fs/ext4", "kernel/fs/jbd2",
           "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko", "kernel/lib/libcrc32c.ko", "kernel/crypto/crc32c_generic.ko")

INIT = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
python3 /insmod.py virtio_pci virtio_blk crc32c_generic ext4
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
: > /etc/fstab
echo "VM capabilities: $(grep CapEff /proc/self/status)"
orgmail-volume prepare /dev/vda; echo "VM prepare rc=$?"
head -c 1048576 /dev/urandom > /srv/mail/marker; sync
echo "VM before fs=$(df -B1 --output=size /srv/mail | tail -1 | tr -d ' ') sha=$(sha256sum < /srv/mail/marker | cut -c1-64)"
old=$(cat /sys/block/vda/size)
echo "VM ready sectors=$old"
while [ "$(cat /sys/block/vda/size)" = "$old" ]; do sleep 0.1; done
echo "VM grown sectors=$(cat /sys/block/vda/size)"
orgmail-volume grow; echo "VM grow rc=$?"
orgmail-volume grow; echo "VM again rc=$?"
echo "VM after fs=$(df -B1 --output=size /srv/mail | tail -1 | tr -d ' ') sha=$(sha256sum < /srv/mail/marker | cut -c1-64)"
echo "VM done"
echo o > /proc/sysrq-trigger
"""


# The root has no kmod (and no depmod ran): modules are loaded with init_module(2), each after the ones
# its .modinfo "depends=" names; xz-compressed ones are unpacked first. Built-in ones are not found.
INSMOD = r"""import ctypes, lzma, os, re, sys
libc = ctypes.CDLL(None, use_errno=True)
files = {}
for top, _, names in os.walk(f"/lib/modules/{os.uname().release}"):
    for n in names:
        if ".ko" in n:
            files[n.split(".ko")[0].replace("-", "_")] = os.path.join(top, n)
loaded = set()
def load(name):
    name = name.replace("-", "_")
    if name in loaded or name not in files:
        return
    loaded.add(name)
    data = open(files[name], "rb").read()
    if files[name].endswith(".xz"):
        data = lzma.decompress(data)
    for dep in re.findall(rb"depends=([^\x00]*)\x00", data)[:1]:
        for d in filter(None, dep.decode().split(",")):
            load(d)
    if libc.syscall(175, data, ctypes.c_ulong(len(data)), b"") != 0 and ctypes.get_errno() != 17:
        print(f"VM insmod {name} failed: errno {ctypes.get_errno()}", flush=True)
for want in sys.argv[1:]:
    load(want)
"""


def missing() -> list[str]:
    """What the VM needs beyond the booted tests' own requirements (harness.require_e2e)."""
    return [f"{tool} (Debian package {package})" for tool, package in ((QEMU, "qemu-system-x86"), ("cpio", "cpio"))
            if not shutil.which(tool)]


def _kernel() -> tuple[Path, Path]:
    """Debian's kernel image and its modules, unpacked from the linux-image package apt names for
    linux-image-amd64 (built once, under a lock, in the e2e cache)."""
    KERNEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{KERNEL_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(KERNEL_DIR.glob("boot/vmlinuz-*"))
        if not found:
            work = KERNEL_DIR.with_name("vm-kernel.tmp")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                                     text=True).stdout
            if "Depends: linux-image-" not in depends:  # no package lists yet
                subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
                depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                                         text=True, check=True).stdout
            package = next(line.split(":", 1)[1].strip() for line in depends.splitlines()
                           if line.strip().startswith("Depends: linux-image-"))
            if subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
                subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True)
            deb = next(work.glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
            shutil.rmtree(KERNEL_DIR, ignore_errors=True)
            (work / "root").rename(KERNEL_DIR)
            shutil.rmtree(work)
            found = sorted(KERNEL_DIR.glob("boot/vmlinuz-*"))
        image = found[-1]
        return image, KERNEL_DIR / "lib" / "modules" / image.name.removeprefix("vmlinuz-")


def build_initramfs(workdir: Path) -> Path:
    """The bare Debian 13 root, the kernel's modules, orgmail-volume and INIT as one cpio archive."""
    _, modules = _kernel()
    root = ensure_rootfs(bare=True)
    extra = workdir / "extra"
    (extra / "usr/local/sbin").mkdir(parents=True)
    shutil.copy(VOLUME_SCRIPT, extra / "usr/local/sbin/orgmail-volume")
    (extra / "usr/local/sbin/orgmail-volume").chmod(0o755)
    (extra / "insmod.py").write_text(INSMOD)
    (extra / "init").write_text(INIT)
    (extra / "init").chmod(0o755)
    for part in MODULES:
        source, target = modules / part, extra / "lib/modules" / modules.name / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.exists():
            shutil.copy(source, target)
    for empty in ("var/tmp", "tmp", "srv"):
        (extra / empty).mkdir(parents=True, exist_ok=True)
    archive = workdir / "initramfs.cpio"
    with archive.open("wb") as out:
        for base in (root, extra):
            names = subprocess.run(
                ["find", ".", "-mindepth", "1", *[x for p in SKIP for x in ("-path", f"./{p}", "-prune", "-o")],
                 "-print0"], cwd=base, capture_output=True, check=True).stdout
            subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=base, input=names, stdout=out,
                           check=True)
    return archive


@dataclass
class VolumeVm:
    """A running VM (see the module's docstring); ``lines`` is its console so far."""

    proc: subprocess.Popen[str]
    qmp: Path
    lines: list[str] = field(default_factory=list)
    _console: queue.Queue[str] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._console.put(line)
            self._console.put("")  # the VM ended
        threading.Thread(target=read, daemon=True).start()

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._console.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                raise AssertionError(f"the VM ended before {prefix!r}:\n" + "".join(self.lines[-60:]))
            self.lines.append(line)
            if prefix in line:  # the firmware's terminal escapes may precede the guest's first line
                return line[line.index(prefix):].strip()
        raise AssertionError(f"no {prefix!r} within {timeout}s:\n" + "".join(self.lines[-60:]))

    def resize_disk(self, size: int) -> None:
        """What EC2's ModifyVolume does under a running instance: the disk grows, the guest is told."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.qmp))
            f = s.makefile("rw")
            f.readline()  # greeting
            for command in ({"execute": "qmp_capabilities"},
                            {"execute": "block_resize", "arguments": {"device": "data", "size": size}}):
                f.write(json.dumps(command) + "\n")
                f.flush()
                reply = json.loads(f.readline())
                while "event" in reply:
                    reply = json.loads(f.readline())
                assert "return" in reply, reply


@contextlib.contextmanager
def boot(workdir: Path, disk_bytes: int) -> Iterator[VolumeVm]:
    kernel, _ = _kernel()
    initramfs = build_initramfs(workdir)
    disk = workdir / "data.img"
    with disk.open("wb") as f:
        f.truncate(disk_bytes)
    qmp = workdir / "qmp.sock"
    # TCG (software emulation), never KVM: nested under this sandbox's own VM, KVM answers but the guest
    # kernel hangs before its first line; TCG boots it in seconds and runs the same everywhere.
    accel = ["-accel", "tcg"]
    proc = subprocess.Popen(
        [QEMU, *accel, "-m", "1024", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
         "-kernel", str(kernel), "-initrd", str(initramfs),
         "-append", "console=ttyS0 panic=-1 loglevel=4",
         "-drive", f"file={disk},if=none,format=raw,id=data", "-device", "virtio-blk-pci,drive=data",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
    try:
        yield VolumeVm(proc, qmp)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
