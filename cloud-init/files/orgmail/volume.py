#!/usr/bin/python3
"""orgmail-volume: the host's protected EBS volume (mailboxes and Postfix's queue) on /srv/mail.

  orgmail-volume prepare DEVICE   the bootstrap: format the volume only if it is proven blank, mount it, grow it
  orgmail-volume grow             every boot (orgmail-volume.service) and every orgmail-sync run: grow
                                  the mounted file system online to the volume's size (a tier change or
                                  a bigger volume in the stack makes the EBS volume bigger, never the
                                  file system on it)

A volume is formatted only when blkid's low-level probe finds nothing AND its first and last MiB
read back as zeros, as on a new EBS volume. blkid's "nothing found" (exit 2) is also its answer when
it cannot read the device, so it alone would let one read error end in mkfs over the mailboxes. Any
read error, any unknown non-zero data and any file system other than ours is refused: the command
fails loudly and changes nothing, and the next run tries again.
"""

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MOUNTPOINT = "/srv/mail"
FSTYPE = "ext4"  # what we create; grown online by resize2fs
LABEL = "orgmail-data"
EDGE = 1024 * 1024  # the first and last MiB: partition tables, superblocks and RAID labels live there
# EBS volumes grow by whole GiB; a smaller difference is the tail ext4 cannot use, not a new size.
MIN_GROWTH = 64 * 1024 * 1024
# For the volume to be attached (EC2 may attach it after the instance started); tests shorten it.
WAIT_SECONDS = int(os.environ.get("ORGMAIL_VOLUME_WAIT_SECONDS", "180"))


class VolumeError(Exception):
    pass


def log(message: str) -> None:
    print(f"orgmail-volume: {message}", flush=True)


def decide(blkid_rc: int, found: dict, edges: Callable[[], bytes]) -> str:
    """"mount" the volume as it is, or "format" it; VolumeError for anything else.

    blkid_rc and found: the exit code and the KEY=VALUE pairs of `blkid -p -o export` on the device;
    edges: reads the device's first and last MiB (raises VolumeError when it cannot)."""
    if blkid_rc == 0:
        if found.get("TYPE") == FSTYPE:
            return "mount"
        what = found.get("TYPE") or (f"a {found['PTTYPE']} partition table" if found.get("PTTYPE") else "a signature")
        raise VolumeError(f"it holds {what}, not {FSTYPE}: refusing to touch it")
    if blkid_rc != 2:
        raise VolumeError(f"blkid cannot probe it (exit {blkid_rc}): refusing to touch it")
    if edges().strip(b"\0"):
        raise VolumeError("it holds data no probe recognises (non-zero bytes in its first or last MiB),"
                          " so it is not proven blank: refusing to format it")
    return "format"


def read_edges(device: str) -> bytes:
    """The first and last MiB of `device`, read from the device itself (not the page cache)."""
    try:
        fd = os.open(device, os.O_RDONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < 2 * EDGE:
                raise VolumeError(f"it has only {size} bytes: refusing to format it")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            data = b""
            for offset in (0, size - EDGE):
                chunk = os.pread(fd, EDGE, offset)
                if len(chunk) != EDGE:
                    raise VolumeError(f"short read at byte {offset}: {len(chunk)} of {EDGE} bytes")
                data += chunk
            return data
        finally:
            os.close(fd)
    except OSError as e:
        raise VolumeError(f"cannot read it ({e}), so it is not proven blank: refusing to format it") from e


def probe(device: str) -> tuple[int, dict]:
    proc = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True, text=True)
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return proc.returncode, found


def needs_growth(device_bytes: int, fs_bytes: int) -> bool:
    return device_bytes - fs_bytes >= MIN_GROWTH


def ext4_bytes(device: str) -> int:
    head = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in head.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def device_bytes(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def grow() -> None:
    """Grow the file system on /srv/mail online to its volume's size, if the volume grew."""
    if not os.path.ismount(MOUNTPOINT):
        raise VolumeError(f"{MOUNTPOINT} is not mounted: nothing to grow")
    out = subprocess.run(["findmnt", "-n", "-r", "-o", "SOURCE,FSTYPE", "--mountpoint", MOUNTPOINT],
                         capture_output=True, text=True, check=True).stdout.split()
    device, fstype = out[0], out[1]
    if fstype != FSTYPE:
        raise VolumeError(f"{MOUNTPOINT} is {fstype}, not {FSTYPE}: cannot grow it")
    have, size = ext4_bytes(device), device_bytes(device)
    if not needs_growth(size, have):
        return
    log(f"{device} is {size >> 20} MiB, its file system {have >> 20} MiB: growing it online (resize2fs)")
    proc = subprocess.run(["resize2fs", device], capture_output=True, text=True)
    if proc.returncode != 0:
        raise VolumeError(f"resize2fs {device} failed: {(proc.stdout + proc.stderr).strip()[-400:]}")
    log(f"{MOUNTPOINT} now has {ext4_bytes(device) >> 20} MiB")


def prepare(device: str) -> None:
    """First boot (and any later bootstrap run): the volume on /srv/mail, formatted only if blank."""
    for _ in range(WAIT_SECONDS):
        if os.path.exists(device):
            break
        time.sleep(1)
    else:
        raise VolumeError(f"{device} is not attached")
    if not os.path.ismount(MOUNTPOINT):
        rc, found = probe(device)
        if decide(rc, found, lambda: read_edges(device)) == "format":
            log(f"{device} is blank (nothing found, its first and last MiB are zeros): creating {FSTYPE}")
            subprocess.run([f"mkfs.{FSTYPE}", "-q", "-L", LABEL, "-m", "0", device], check=True)
        fstab = Path("/etc/fstab")
        if f" {MOUNTPOINT} " not in fstab.read_text():
            with fstab.open("a") as f:
                f.write(f"{device} {MOUNTPOINT} {FSTYPE} defaults,nofail,x-systemd.device-timeout=180s 0 2\n")
        os.makedirs(MOUNTPOINT, exist_ok=True)
        subprocess.run(["mount", MOUNTPOINT], check=True)
    grow()


def main(argv: list) -> int:
    try:
        if argv[1:2] == ["prepare"] and len(argv) == 3:
            prepare(argv[2])
        elif argv[1:] == ["grow"]:
            grow()
        else:
            print("usage: orgmail-volume prepare DEVICE | orgmail-volume grow", file=sys.stderr)
            return 2
    except (VolumeError, subprocess.CalledProcessError, OSError) as e:
        where = argv[2] if len(argv) > 2 else MOUNTPOINT
        print(f"orgmail-volume: {where}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
