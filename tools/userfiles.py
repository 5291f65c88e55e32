"""The single mailbox host's user files, as orgmail-sync writes them there, made without a host by the
program's own code: a stack config -> components.settings.load_settings -> components.secrets.host_config
(the SSM `config` parameter) and the password hashes (the `mailbox-passwords` parameter) -> sync.py's
apply, with its writes caught and its commands answered.

For `orgmail-users import` (the migration into the ISP cluster's directory): its tests
(tests/unit/test_directory.py) and its benchmark (bench/provision.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYNC = ROOT / "cloud-init/files/orgmail/sync.py"

# orgmail-users import's option for each file, and where orgmail-sync writes it on the mailbox host.
FILES = {
    "--dovecot-users": "/etc/dovecot/orgmail-users",
    "--postfix-domains": "/etc/postfix/orgmail/domains",
    "--postfix-mailboxes": "/etc/postfix/orgmail/mailboxes",
    "--postfix-aliases": "/etc/postfix/orgmail/aliases",
}


def sync_module() -> ModuleType:
    """A fresh copy of sync.py, whose globals can be replaced without touching anyone else's."""
    spec = importlib.util.spec_from_file_location("orgmail_sync_render", SYNC)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(config: dict[str, Any], hashes: dict[str, str]) -> dict[str, str]:
    """{import option: file text} from the `config` and `mailbox-passwords` parameters' documents."""
    sync = sync_module()
    written: dict[str, str] = {}

    def write(path: str, content: str, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> bool:
        written[path] = content
        return True

    def run(cmd: Any, *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, "", "")

    for name, value in (("write", write), ("group_id", lambda name: 0),
                        ("subprocess", SimpleNamespace(run=run, SubprocessError=subprocess.SubprocessError))):
        setattr(sync, name, value)
    env = {"ROLE": "mailbox", "HOSTNAME": config["mailHost"]}
    params = {"config": json.dumps(config), "mailbox-passwords": json.dumps(hashes), "files/mailbox": "{}"}
    sync.refuse_incomplete(env, params)
    sync.apply(env, params, set())
    return {option: written[path] for option, path in FILES.items()}


def from_stack(raw: dict[str, Any], hashes: dict[str, str] | None = None) -> dict[str, str]:
    """The files of a stack config (short keys, as load_settings takes them); hashes: the stack's
    passwordHashes unless given (a deploy adds the generated passwords' hashes)."""
    from components.secrets import host_config
    from components.settings import load_settings

    settings = load_settings(raw, "import")
    return render(host_config(settings), dict(settings.password_hashes) if hashes is None else hashes)


def generated_stack(users: int, hashes: list[str], domains: int = 10) -> dict[str, Any]:
    """A valid single-host stack config with `users` mailboxes over `domains` domains: every 4th
    without a quota (unlimited), every 10th with an alias of its own, one list alias per domain (to
    its first ten mailboxes and one outside address) and every hash from `hashes`, in turn."""
    names = [f"d{k}.example" for k in range(domains)]
    boxes = []
    for i in range(users):
        box: dict[str, Any] = {"address": f"user{i:05d}@{names[i % domains]}"}
        if i % 4:
            box["quota"] = ("1G", "2G", "500M")[i % 3]
        else:
            box["quota"] = "unlimited"  # unset would be the tier's defaultQuota
        if i % 10 == 0:
            box["aliases"] = [f"alias{i:05d}@{names[i % domains]}"]
        boxes.append(box)
    lists = {f"list@{name}": [b["address"] for b in boxes if b["address"].endswith("@" + name)][:10]
             + [f"archive@outside{k}.example"] for k, name in enumerate(names)}
    return {
        "organization": "Import Bench", "tier": "isp", "region": "eu-central-1",
        "cloudflareAccountId": "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "mailHost": f"mail.{names[0]}",
        "domains": [{"name": n, "zoneId": f"{k + 1:032x}"} for k, n in enumerate(names)],
        "mailboxes": boxes, "aliases": lists,
        "passwordHashes": {b["address"]: hashes[i % len(hashes)] for i, b in enumerate(boxes)},
        "admin": {"email": boxes[0]["address"], "ssm": True},
    }


def write_files(texts: dict[str, str], directory: Path) -> list[str]:
    """The files in `directory` (users file mode 0600: it holds hashes); orgmail-users import's arguments."""
    args: list[str] = []
    for option, text in texts.items():
        path = directory / Path(FILES[option]).name
        path.touch(mode=0o600)
        path.write_text(text)
        args += [option, str(path)]
    return args
