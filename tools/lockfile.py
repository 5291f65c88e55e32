"""Hash-pinned requirement locks for the deploy jobs (`pip install --require-hashes -r requirements.lock`).

    pip download -r requirements.txt -d DIR        # on Linux x86_64, CPython 3.11 (as the runner)
    python -m tools.lockfile DIR --source requirements.txt > requirements.lock

Writes one `name==version --hash=sha256:...` entry per distribution file in DIR (every file of one
version is listed, so a wheel and its sdist both verify). The tests read a lock back with
`read_lock` and check it against the requirement file it was made from and against the installed
packages' own dependency metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

# A wheel is name-version-...whl (PEP 427); an sdist is name-version.tar.gz (PEP 625).
WHEEL = re.compile(r"(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)-[^-]+(-[^-]+)?-[^-]+-[^-]+\.whl")
SDIST = re.compile(r"(?P<name>[A-Za-z0-9_.-]+?)-(?P<version>[0-9][A-Za-z0-9_.+!]*)\.(tar\.gz|zip)")
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(?P<version>[A-Za-z0-9_.+!-]+)")
HASH = re.compile(r"--hash=sha256:(?P<digest>[0-9a-f]{64})")


class LockError(ValueError):
    pass


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel or sdist file name."""
    m = WHEEL.fullmatch(filename) or SDIST.fullmatch(filename)
    if m is None:
        raise LockError(f"{filename}: not a wheel or sdist file name")
    return canonical(m["name"]), m["version"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock_text(download_dir: Path, source: str) -> str:
    """The lock for every distribution file in `download_dir`, sorted by name."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(download_dir.iterdir()):
        if path.is_file():
            found.setdefault(distribution(path.name), []).append(sha256(path))
    names = [n for n, _ in found]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise LockError(f"{download_dir}: more than one version of {', '.join(clash)}")
    lines = [f"# Hash-pinned closure of {source} for the deploy jobs (pip install --require-hashes).",
             f"# Made by: pip download -r {source} -d DIR && python -m tools.lockfile DIR --source {source}",
             "# Never edit by hand: change the pins in the source file and make it again."]
    for (name, version), digests in sorted(found.items()):
        hashes = " \\\n".join(f"    --hash=sha256:{d}" for d in sorted(set(digests)))
        lines.append(f"{name}=={version} \\\n{hashes}")
    return "\n".join(lines) + "\n"


def read_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256, ...])}; every entry must carry at least one hash."""
    entries: dict[str, tuple[str, list[str]]] = {}
    joined = re.sub(r"\\\n", " ", text)
    for number, line in enumerate(joined.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, rest = line.partition(" ")
        pin = PIN.fullmatch(requirement)
        if pin is None:
            raise LockError(f"entry {number}: {requirement!r} is not pinned as name==version")
        digests = [m["digest"] for m in HASH.finditer(rest)]
        if not digests or HASH.sub("", rest).strip():
            raise LockError(f"entry {number}: {requirement} needs --hash=sha256:<64 hex> options and nothing else")
        name = canonical(pin["name"])
        if name in entries:
            raise LockError(f"entry {number}: {name} is listed twice")
        entries[name] = (pin["version"], digests)
    return entries


def read_pins(text: str) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a requirement file (no -r includes)."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        pin = PIN.fullmatch(line)
        if pin is None:
            raise LockError(f"{line!r}: every requirement must be pinned as name==version")
        pins[canonical(pin["name"])] = pin["version"]
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("download_dir", type=Path, help="directory filled by pip download")
    parser.add_argument("--source", required=True, help="the requirement file it was downloaded from")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(lock_text(args.download_dir, args.source))
    except LockError as e:
        print(f"tools.lockfile: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
