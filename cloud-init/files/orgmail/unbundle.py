#!/usr/bin/python3
"""orgmail-unbundle: write a host's files from its bundle in SSM.

The files beyond the bootstrap (scripts, orgmail-sync, units, most configuration) do not fit in EC2's 16 KB
of user-data; they are stored as BUNDLE_PATH/part-000, part-001, ... (JSON {path: {mode, content}}, joined
in order; "-" marks an unused part; the JSON is stored gzipped and base64-encoded). BUNDLE_PATH is a single host's own SSM_PATH/bundle/<host name>, or a
cluster role's SSM_PATH/bundle (the same on every host of the role). They are written only if the joined
value has the SHA-256 this instance's user-data names (BUNDLE_SHA256 in /etc/orgmail/host.env): a bundle
changed behind Pulumi's back configures nothing, and a changed bundle comes with new instances.

    orgmail-unbundle        exit 0: every file written; 1: nothing written (the bootstrap fails and retries)
"""

import base64
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping

ATTEMPTS = 6



def joined(parameters: list, path: str) -> str:
    """The bundle from its parts under `path`, in the order of their names."""
    parts = sorted((p["Name"], p["Value"]) for p in parameters if p["Name"].startswith(f"{path}/part-"))
    if not parts:
        raise RuntimeError(f"no {path}/part-NNN parameter")
    return "".join(value for _, value in parts if value != "-")


# The stored form (components/userdata.py bundle_json): the JSON gzipped and base64-encoded, behind this prefix.
PREFIX = "gzip+base64:"


def verified(bundle: str, sha256: str) -> dict:
    digest = hashlib.sha256(bundle.encode()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"the bundle has SHA-256 {digest}, this instance's user-data names {sha256}: nothing written")
    if not bundle.startswith(PREFIX):
        raise RuntimeError(f"the bundle does not start with {PREFIX!r}: nothing written")
    files = json.loads(gzip.decompress(base64.b64decode(bundle[len(PREFIX):], validate=True)))
    for path, spec in files.items():
        if not path.startswith("/") or ".." in path.split("/") or not isinstance(spec.get("content"), str):
            raise RuntimeError(f"the bundle names {path!r}: nothing written")
    return files


def write(path: str, content: str, mode: int) -> None:
    """Atomically, born with its final mode."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.orgmail-new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def bundle_path(env: Mapping[str, str]) -> str:
    return env.get("BUNDLE_PATH") or f"{env['SSM_PATH']}/bundle"


def fetch(env: Mapping[str, str]) -> list:
    res = subprocess.run(["aws", "ssm", "get-parameters-by-path", "--region", env["REGION"],
                          "--path", bundle_path(env), "--with-decryption", "--output", "json"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise RuntimeError(f"aws ssm get-parameters-by-path: {res.stderr.strip()[-300:]}")
    return json.loads(res.stdout)["Parameters"]


ENV_FILE = "/etc/orgmail/host.env"


def host_env() -> dict:
    """The host's settings from host.env (KEY=VALUE lines), under those already in the environment: the
    bootstrap's unit passes them (EnvironmentFile), an administrator who runs the bootstrap again does not."""
    env = {}
    if os.path.exists(ENV_FILE):
        with open(ENV_FILE) as f:
            for line in f.read().splitlines():
                if line and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    env[key] = value
    return {**env, **os.environ}


def main() -> int:
    env = host_env()
    # On EC2 the instance role supplies credentials; host.env has AWS_* settings only in tests.
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    error = ""
    for attempt in range(ATTEMPTS):
        try:
            files = verified(joined(fetch(env), bundle_path(env)), env["BUNDLE_SHA256"])
            for path, spec in sorted(files.items()):
                write(path, spec["content"], int(spec["mode"], 8))
            print(f"orgmail-unbundle: bundle {env['BUNDLE_SHA256']}: {len(files)} files written")
            return 0
        except (RuntimeError, subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
            error = str(e)
        print(f"orgmail-unbundle: attempt {attempt + 1}/{ATTEMPTS}: {error}", file=sys.stderr)
        if attempt + 1 < ATTEMPTS:
            time.sleep(5)
    return 1


if __name__ == "__main__":
    sys.exit(main())
