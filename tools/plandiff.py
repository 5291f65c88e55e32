"""Offline plan diff: what would change between two offline plans, secrets masked.

    python -m tools.plandiff OLD NEW [--json]
    python -m tools.plandiff main:Pulumi.dev.yaml Pulumi.dev.yaml
    python -m tools.plandiff --old-tree ../base Pulumi.dev.yaml Pulumi.dev.yaml

OLD and NEW are stack files (Pulumi.<stack>.yaml), or REV:PATH for a stack file as of a git
revision (read with `git show REV:PATH`). Both plans are made by the CURRENT program code on the
mock engine, so REV:PATH shows what the config change alone does. To include program changes, check
the base revision out elsewhere and pass --old-tree DIR: OLD (relative to DIR) is then planned by
DIR's own program, in a subprocess with DIR first on the import path (what the pull-request
workflow does). A stack file missing on the old side counts as an empty plan.

Prints first the hosts the change replaces or restarts (and the settings that caused it), then who
receives what ("Mail routing": mailboxes added and removed, quota changes, aliases
and their targets, and in front every new forward to an address outside the stack's domains), read
from the hosts' configuration parameter, which holds no secret; then the encrypted (secure:) settings
that changed, which no offline plan can read; then the added, removed and changed resources (changed
input keys, old -> new), the DNS records, and a unified diff of each host's user-data. Secret values
(password hashes among them) are never printed: a changed secret shows as "[secret] -> [secret]
(changed)", compared by a keyed hash that lives only in this run.

Values the mock engine makes afresh on every run are named after the resource that makes them,
so they compare stably: Elastic IPs (<public IP of mail-ip>), generated passwords and their
bcrypt hashes, and the DKIM key pair, including the public key inside the DKIM TXT record
(<public key of secrets-dkim-s2026>). A real deployment keeps these in state, so they change only
when their resource is replaced, which the diff shows as a new resource name (e.g. a new DKIM
selector) and a new token in every value derived from it.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tools.mockengine import MockRun

EIP = "aws:ec2/eip:Eip"
PASSWORD = "random:index/randomPassword:RandomPassword"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"
RECORD = "cloudflare:index/dnsRecord:DnsRecord"
INSTANCE = "aws:ec2/instance:Instance"
AMI_COPY = "aws:ec2/amiCopy:AmiCopy"
USER_DATA_KEY = "userDataBase64"
PARAMETER = "aws:ssm/parameter:Parameter"
CONFIG_PART_RE = re.compile(r"/orgmail/[^/]+/config/part-([0-9]{3})")  # host_config, split into parts
SALT_ENV = "ORGMAIL_PLANDIFF_SALT"
SECRET = "[secret]"

Snapshot = dict[str, Any]
NO_MAIL: dict[str, Any] = {"domains": [], "mailboxes": {}, "aliases": {}}  # a stack that does not exist yet


# --- Normalising values the mock engine generates ------------------------------------------

def substitutions(run: MockRun) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, token) for every value the mock engine generates on each run."""
    subs: list[tuple[re.Pattern[str], str]] = []
    for r in run.resources:
        out = r.outputs
        if r.type == EIP and isinstance(out.get("publicIp"), str):
            subs.append((re.compile(r"(?<![\d.])" + re.escape(out["publicIp"]) + r"(?!\d)"),
                         f"<public IP of {r.name}>"))
        elif r.type == PASSWORD:
            for key in ("bcryptHash", "result"):
                if isinstance(out.get(key), str) and out[key]:
                    subs.append((re.compile(re.escape(out[key])), f"<{key} of {r.name}>"))
        elif r.type == PRIVATE_KEY:
            for key in ("privateKeyPem", "publicKeyPem"):
                if isinstance(out.get(key), str) and out[key]:
                    subs.append((re.compile(re.escape(out[key])), f"<{key} of {r.name}>"))
            pem = out.get("publicKeyPem")
            if isinstance(pem, str):
                # DKIM TXT p= value: the PEM body on one line, possibly split into "..." "..." strings.
                body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
                if body:
                    subs.append((re.compile('(?:" ")?'.join(re.escape(c) for c in body)),
                                 f"<public key of {r.name}>"))
    return subs


def normalise(value: Any, subs: list[tuple[re.Pattern[str], str]]) -> Any:
    if isinstance(value, str):
        for pattern, token in subs:
            value = pattern.sub(token, value)
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: normalise(v, subs) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, subs) for v in value]
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: value}


def _at(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _digest(value: Any, salt: bytes) -> str:
    return hmac.new(salt, json.dumps(value, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _user_data_text(inputs: dict[str, Any]) -> str | None:
    from tools.plan import user_data_text

    try:
        return user_data_text(inputs)
    except (KeyError, ValueError, OSError):
        return None


def snapshot(run: MockRun, salt: bytes) -> Snapshot:
    """The run's resources, DNS records and user-data as comparable, secret-free JSON data."""
    subs = substitutions(run)
    resources: dict[str, Any] = {}
    records: dict[str, Any] = {}
    user_data: dict[str, str] = {}
    hosts: dict[str, str] = {}  # instance resource -> host name
    for r in run.resources:
        shown = flatten(normalise(r.masked_inputs, subs))
        plain = normalise(r.inputs, subs)
        fields: dict[str, Any] = {}
        for key, value in shown.items():
            if key == USER_DATA_KEY:
                text = _user_data_text(r.inputs)
                if text is not None:
                    user_data[r.name] = normalise(text, subs)
                fields[key] = {"shown": "(see the user-data diff)", "digest": _digest(user_data.get(r.name), salt)}
            elif SECRET in json.dumps(value):
                fields[key] = {"shown": value, "digest": _digest(_at(plain, key), salt), "secret": True}
            else:
                fields[key] = {"shown": value, "digest": _digest(value, salt)}
        resources[f"{r.type} {r.name}"] = {"type": r.type, "name": r.name, "protect": r.protect, "fields": fields}
        if r.type == INSTANCE:
            hosts[r.name] = str((r.inputs.get("tags") or {}).get("Name", r.name))
        if r.type == RECORD:
            masked = normalise(r.masked_inputs, subs)
            records[r.name] = {k: masked.get(k) for k in ("type", "name", "content", "data", "priority", "ttl", "proxied")}
    return {"resources": resources, "dns": records, "userData": user_data, "hosts": hosts, "mail": mail_routing(run)}


def mail_routing(run: MockRun) -> dict[str, Any] | None:
    """Who receives what, from the hosts' configuration parameter (SSM marks every parameter value
    secret, but this one holds no secret; the password hashes live in another): the mailboxes with
    their quotas, every alias with its targets, and the domains. None if the program stores no such
    parameter (another program version)."""
    parts: dict[int, str] = {}
    for r in run.of_type(PARAMETER):
        found = CONFIG_PART_RE.fullmatch(str(r.inputs.get("name")))
        if found and isinstance(r.inputs.get("value"), str):
            parts[int(found.group(1))] = r.inputs["value"]
    text = "".join("" if parts[i] == "-" else parts[i] for i in sorted(parts))  # "-": an unused part
    try:
        config = json.loads(text)
        return {"domains": sorted(config["domains"]),
                "mailboxes": {m["address"]: m.get("quota") for m in config["mailboxes"]},
                "aliases": {a: sorted(t) for a, t in config["aliases"].items()}}
    except (ValueError, KeyError, TypeError):
        return None


def encrypted_digests(text: str, salt: bytes) -> dict[str, str]:
    """Every secure: value of a stack file's text -> keyed hash of its ciphertext (never shown)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    found: dict[str, str] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict) and set(value) == {"secure"}:
            found[where] = _digest(value["secure"], salt)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")

    config = doc.get("config") if isinstance(doc, dict) else None
    for key, value in (config if isinstance(config, dict) else {}).items():
        walk(value, str(key))
    return found


# --- Making the two plans --------------------------------------------------------------------

def _snapshot_of_text(text: str | None, stack_file_name: str, salt: bytes, label: str | None = None) -> Snapshot:
    """The snapshot of a stack file's text; `label` (the file as the user named it) in error messages.

    Runs in an older checkout too (--old-tree): only stackfile APIs every version has are required.
    """
    if text is None:
        return {"resources": {}, "dns": {}, "userData": {}, "mail": dict(NO_MAIL), "encrypted": {}}
    from components.settings import load_settings, raw_from_pulumi_config
    from tools.mockengine import run_program
    from tools.stackfile import load_stack_config, stack_name

    try:
        from tools.stackfile import read_stack_document
    except ImportError:  # an older program: its own errors
        pass
    else:
        read_stack_document(Path(label or stack_file_name), text)  # a broken file: one line naming it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / stack_file_name
        path.write_text(text)
        stack = stack_name(path)
        config = load_stack_config(path)
    project: str | None
    try:
        from tools.stackfile import project_name
    except ImportError:  # an older program: one project name for every stack
        shot = snapshot(run_program(config, stack), salt)
        project = None
    else:
        project = project_name(Path(stack_file_name))  # the Pulumi.yaml of the directory plandiff runs in
        shot = snapshot(run_program(config, stack, project=project), salt)
    shot["encrypted"] = encrypted_digests(text, salt)
    try:
        from components.server import replacing_values
    except ImportError:  # an older program: the diff says it cannot tell (host_changes)
        return shot
    raw = raw_from_pulumi_config(config)
    settings = load_settings(raw, stack) if project is None else load_settings(raw, stack, project)
    shot["replacing"] = {k: _digest(v, salt) for k, v in replacing_values(settings).items()}
    return shot


def read_spec(spec: str) -> tuple[str | None, str]:
    """(stack file text or None if absent, file name) for PATH or REV:PATH."""
    path = Path(spec)
    if path.exists() or ":" not in spec:
        return (path.read_text() if path.exists() else None), path.name
    rev, _, rel = spec.partition(":")
    shown = subprocess.run(["git", "show", f"{rev}:{rel}"], capture_output=True, text=True)
    return (shown.stdout if shown.returncode == 0 else None), Path(rel).name


def snapshot_in_tree(tree: Path, spec: str, salt: bytes) -> Snapshot:
    """Plan `spec` (relative to `tree`) with the program in `tree`, in a subprocess."""
    stack_file = spec if Path(spec).is_absolute() else str(tree / spec)
    if not Path(stack_file).exists():
        return {"resources": {}, "dns": {}, "userData": {}, "mail": dict(NO_MAIL), "encrypted": {}}
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), SALT_ENV: salt.hex()}
    code = ("import runpy, sys; sys.argv = [sys.argv[1], '--snapshot', sys.argv[2]];"
            " runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve()), stack_file],
                          cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"planning {spec} in {tree} failed:\n{done.stderr.strip()}")
    result: Snapshot = json.loads(done.stdout)
    return result


# --- Comparing ---------------------------------------------------------------------------------

def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    changes = []
    for key in sorted(set(old) | set(new)):
        o, n = old.get(key), new.get(key)
        if o is not None and n is not None and o["digest"] == n["digest"]:
            continue
        secret = bool((o or {}).get("secret") or (n or {}).get("secret"))
        changes.append({"key": key, "old": o["shown"] if o else None, "new": n["shown"] if n else None,
                        "secret": secret})
    return changes


def compare(old: Snapshot, new: Snapshot) -> dict[str, Any]:
    o_res = {k: v for k, v in old["resources"].items() if v["type"] != RECORD}  # records: own section
    n_res = {k: v for k, v in new["resources"].items() if v["type"] != RECORD}
    resources: dict[str, Any] = {
        "added": [{"type": n_res[k]["type"], "name": n_res[k]["name"]} for k in sorted(set(n_res) - set(o_res))],
        "removed": [{"type": o_res[k]["type"], "name": o_res[k]["name"]} for k in sorted(set(o_res) - set(n_res))],
        "changed": [], "unchanged": 0}
    for key in sorted(set(o_res) & set(n_res)):
        changes = _changes(o_res[key]["fields"], n_res[key]["fields"])
        if o_res[key]["protect"] != n_res[key]["protect"]:
            changes.append({"key": "(protect)", "old": o_res[key]["protect"], "new": n_res[key]["protect"],
                            "secret": False})
        if changes:
            resources["changed"].append({"type": n_res[key]["type"], "name": n_res[key]["name"], "changes": changes})
        else:
            resources["unchanged"] += 1

    o_dns, n_dns = old["dns"], new["dns"]
    dns: dict[str, Any] = {
        "added": [n_dns[k] | {"resource": k} for k in sorted(set(n_dns) - set(o_dns))],
        "removed": [o_dns[k] | {"resource": k} for k in sorted(set(o_dns) - set(n_dns))],
        "changed": []}
    for key in sorted(set(o_dns) & set(n_dns)):
        if o_dns[key] != n_dns[key]:
            fields = [{"key": f, "old": o_dns[key].get(f), "new": n_dns[key].get(f)}
                      for f in o_dns[key] if o_dns[key].get(f) != n_dns[key].get(f)]
            dns["changed"].append({"resource": key, "record": n_dns[key], "changes": fields})

    user_data: dict[str, Any] = {}
    o_ud, n_ud = old["userData"], new["userData"]
    for host in sorted(set(o_ud) | set(n_ud)):
        a, b = o_ud.get(host, ""), n_ud.get(host, "")
        if a == b:
            continue
        lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), f"old/{host}", f"new/{host}", lineterm=""))
        added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
        removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
        status = "added" if host not in o_ud else "removed" if host not in n_ud else "changed"
        entry: dict[str, Any] = {"status": status, "linesAdded": added, "linesRemoved": removed}
        if status == "changed":
            entry["diff"] = "\n".join(lines)
        user_data[host] = entry
    return {"resources": resources, "dns": dns, "userData": user_data, "hosts": host_changes(old, new, resources),
            "mail": compare_mail(old.get("mail"), new.get("mail")),
            "encrypted": compare_encrypted(old.get("encrypted") or {}, new.get("encrypted") or {})}


# Inputs of an instance whose change makes Pulumi replace it (user_data_replace_on_change, the image,
# its interface) or stop and start it (instanceType).
REPLACING_INPUTS = ("userDataBase64", "ami", "primaryNetworkInterface.networkInterfaceId", "availabilityZone",
                    "subnetId")
RESTARTING_INPUTS = ("instanceType",)


def host_changes(old: Snapshot, new: Snapshot, resources: dict[str, Any]) -> dict[str, Any]:
    """Which hosts this change replaces or restarts, and which of the settings that replace hosts changed."""
    from components.server import replacing_settings

    names = {**old.get("hosts", {}), **new.get("hosts", {})}
    replaced, restarted = [], []
    for c in resources["changed"]:
        if c["type"] != INSTANCE:
            continue
        keys = [ch["key"] for ch in c["changes"]]
        host = names.get(c["name"], c["name"])
        if why := [k for k in keys if k in REPLACING_INPUTS]:
            replaced.append({"host": host, "resource": c["name"], "inputs": why})
        elif why := [k for k in keys if k in RESTARTING_INPUTS]:
            restarted.append({"host": host, "resource": c["name"], "inputs": why})
    # A new image copy (a new pinned orgmail:amiId) gives every instance a new image id, which the
    # mock engine cannot show on the instances themselves.
    if any(c["type"] == AMI_COPY and "sourceAmiId" in [ch["key"] for ch in c["changes"]] for c in resources["changed"]):
        done = {r["resource"] for r in replaced}
        replaced += [{"host": names[i], "resource": i, "inputs": ["ami"]}
                     for i in new.get("hosts", {}) if i not in done]
    o, n = old.get("replacing", {}), new.get("replacing", {})
    # None: a side planned by an older program, which does not say.
    changed = sorted(k for k in set(o) | set(n) if o.get(k) != n.get(k)) if o and n else None
    return {"replaced": replaced, "restarted": restarted, "settingsChanged": changed,
            "replacingSettings": list(replacing_settings())}


def compare_mail(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """Who receives what, old -> new: mailboxes and quotas, aliases and their targets, and every target
    outside the stack's domains that an alias newly forwards to. None if either side is unknown."""
    if old is None or new is None:
        return None
    o_box, n_box = old["mailboxes"], new["mailboxes"]
    o_al, n_al = old["aliases"], new["aliases"]
    domains = set(new["domains"])

    def outside(address: str) -> bool:
        return address.rsplit("@", 1)[-1] not in domains

    changed = []
    forwards = []
    for alias in sorted(set(o_al) | set(n_al)):
        before, after = set(o_al.get(alias, [])), set(n_al.get(alias, []))
        forwards += [{"alias": alias, "target": t} for t in sorted(after - before) if outside(t)]
        if alias in o_al and alias in n_al and before != after:
            changed.append({"alias": alias, "added": sorted(after - before), "removed": sorted(before - after)})
    return {
        "mailboxesAdded": [{"address": a, "quota": n_box[a]} for a in sorted(set(n_box) - set(o_box))],
        "mailboxesRemoved": [{"address": a, "quota": o_box[a]} for a in sorted(set(o_box) - set(n_box))],
        "quotasChanged": [{"address": a, "old": o_box[a], "new": n_box[a]}
                          for a in sorted(set(o_box) & set(n_box)) if o_box[a] != n_box[a]],
        "aliasesAdded": [{"alias": a, "targets": n_al[a]} for a in sorted(set(n_al) - set(o_al))],
        "aliasesRemoved": [{"alias": a, "targets": o_al[a]} for a in sorted(set(o_al) - set(n_al))],
        "aliasesChanged": changed,
        "outsideForwardsAdded": forwards,
    }


def compare_encrypted(old: dict[str, str], new: dict[str, str]) -> list[dict[str, str]]:
    """Encrypted (secure:) settings added, removed or changed: the offline plans cannot see them."""
    changes = []
    for setting in sorted(set(old) | set(new)):
        if setting not in old:
            changes.append({"setting": setting, "change": "added"})
        elif setting not in new:
            changes.append({"setting": setting, "change": "removed"})
        elif old[setting] != new[setting]:
            changes.append({"setting": setting, "change": "changed"})
    return changes


# --- Printing ----------------------------------------------------------------------------------

def _value(value: Any, limit: int = 160) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _pair(old: Any, new: Any, context: int = 40) -> str:
    """old -> new; long strings are cut to the part that differs, with some context."""
    if isinstance(old, str) and isinstance(new, str) and max(len(old), len(new)) > 160:
        start = 0
        while start < min(len(old), len(new)) and old[start] == new[start]:
            start += 1
        end = 0
        while end < min(len(old), len(new)) - start and old[-1 - end] == new[-1 - end]:
            end += 1
        lo, head = max(0, start - context), "..." if start > context else ""

        def cut(s: str) -> str:
            stop = len(s) - max(0, end - context)
            text = json.dumps(s[lo:stop])[1:-1]
            return head + (text if len(text) <= 400 else text[:400]) + ("..." if stop < len(s) or len(text) > 400 else "")

        return f'"{cut(old)}" -> "{cut(new)}"'
    return f"{_value(old)} -> {_value(new)}"


def _record_line(d: dict[str, Any]) -> str:
    prio = f" {d['priority']}" if d.get("priority") is not None else ""
    content = d["content"] if d.get("content") is not None else d.get("data")
    return f"{d['type']:<5} {d['name']}{prio} {_value(content, 120)} (ttl {d['ttl']})"


def format_mail(mail: dict[str, Any] | None) -> list[str]:
    """The mail routing section: who receives what, forwards out of the stack's domains first."""
    if mail is None:
        return ["Mail routing: not compared (one side's program stores the host configuration differently)"]
    if not any(mail.values()):
        return ["Mail routing: unchanged"]
    out_of = {(f["alias"], f["target"]) for f in mail["outsideForwardsAdded"]}

    def targets(alias: str, addresses: list[str]) -> str:
        return ", ".join(t + (" (outside)" if (alias, t) in out_of else "") for t in addresses)

    def quota(q: str | None) -> str:
        return f"quota {q}" if q else "no quota"

    out = ["Mail routing (who receives what; password hashes are not shown):"]
    out += [f"  ! mail to {f['alias']} now also leaves for {f['target']}, outside your domains"
            for f in mail["outsideForwardsAdded"]]
    out += [f"  + mailbox {m['address']} ({quota(m['quota'])})" for m in mail["mailboxesAdded"]]
    out += [f"  - mailbox {m['address']} (no longer receives or logs in; its stored mail stays on the volume)"
            for m in mail["mailboxesRemoved"]]
    out += [f"  ~ mailbox {q['address']}: quota {q['old'] or 'none'} -> {q['new'] or 'none'}"
            for q in mail["quotasChanged"]]
    out += [f"  + alias {a['alias']} -> {targets(a['alias'], a['targets'])}" for a in mail["aliasesAdded"]]
    out += [f"  - alias {a['alias']} (was -> {', '.join(a['targets'])})" for a in mail["aliasesRemoved"]]
    for a in mail["aliasesChanged"]:
        parts = [f"+ {targets(a['alias'], [t])}" for t in a["added"]] + [f"- {t}" for t in a["removed"]]
        out.append(f"  ~ alias {a['alias']}: {', '.join(parts)}")
    return out


def format_encrypted(changes: list[dict[str, str]]) -> list[str]:
    if not changes:
        return []
    return ["", "Encrypted settings (secure:):"] + [
        f"  {c['setting']}: encrypted value {c['change']} (not decrypted offline; the plans above are made without it)"
        for c in changes]


def format_diff(diff: dict[str, Any], old_label: str, new_label: str) -> str:
    res, dns, ud = diff["resources"], diff["dns"], diff["userData"]
    out = [f"Offline plan diff: {old_label} -> {new_label}", ""]
    out += format_hosts(diff["hosts"]) + [""]
    out += format_mail(diff.get("mail"))
    out += format_encrypted(diff.get("encrypted") or [])
    out.append("")
    out.append(f"Resources: {len(res['added'])} to add, {len(res['removed'])} to remove, "
               f"{len(res['changed'])} to change, {res['unchanged']} unchanged")
    out += [f"  + {r['type']}  {r['name']}" for r in res["added"]]
    out += [f"  - {r['type']}  {r['name']}" for r in res["removed"]]
    for c in res["changed"]:
        out.append(f"  ~ {c['type']}  {c['name']}")
        for ch in c["changes"]:
            tail = " (changed)" if ch["secret"] else ""
            if ch["secret"] and ch["key"] == "value" and re.search(r"-config-[0-9]{3}$", c["name"]):
                tail = " (changed: the hosts' configuration; who receives what is under Mail routing above)"
            out.append(f"      {ch['key']}: {_pair(ch['old'], ch['new'])}{tail}")
    out += ["", f"DNS records: {len(dns['added'])} to add, {len(dns['removed'])} to remove, "
                f"{len(dns['changed'])} to change"]
    out += [f"  + {_record_line(d)}" for d in dns["added"]]
    out += [f"  - {_record_line(d)}" for d in dns["removed"]]
    for c in dns["changed"]:
        out.append(f"  ~ {c['record']['type']:<5} {c['record']['name']}")
        out += [f"      {f['key']}: {_pair(f['old'], f['new'])}" for f in c["changes"]]
    out += ["", "User-data:" if ud else "User-data: unchanged on every host"]
    for host, entry in ud.items():
        out.append(f"  {host}: {entry['status']}, {entry['linesAdded']} lines added, {entry['linesRemoved']} removed")
        if "diff" in entry:
            out += ["    " + line for line in entry["diff"].splitlines()]
    return "\n".join(out)


INPUT_WORDS = {"userDataBase64": "its user-data changes", "ami": "its image changes",
               "instanceType": "its instance type changes"}


def format_hosts(hosts: dict[str, Any]) -> list[str]:
    """The first thing a reviewer reads: which hosts go down, and why."""
    replaced, restarted = hosts["replaced"], hosts["restarted"]
    if not replaced and not restarted:
        return ["Hosts: none replaced or restarted (day-2 changes only: orgmail-sync applies them)"]
    out = []
    if replaced:
        order = " one after another, mailbox host first" if len(replaced) > 1 else ""
        out.append(f"Hosts: {len(replaced)} replaced{order}")
    for r in replaced:
        why = ", ".join(INPUT_WORDS.get(k, f"{k} changes") for k in r["inputs"])
        out.append(f"  ! this replaces host {r['host']} (minutes without service): {why}")
    for r in restarted:
        why = ", ".join(INPUT_WORDS.get(k, f"{k} changes") for k in r["inputs"])
        out.append(f"  ! this stops and starts host {r['host']} (minutes without service): {why}")
    if replaced:
        if hosts["settingsChanged"]:
            out.append(f"    because these settings changed: {', '.join(hosts['settingsChanged'])}")
        elif hosts["settingsChanged"] == []:
            out.append("    because the program changed (templates or code), not a setting")
    out.append("  Settings that replace hosts (they make user-data or the image): "
               + ", ".join(hosts["replacingSettings"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="old stack file, or REV:PATH (as of a git revision)")
    parser.add_argument("new", nargs="?", help="new stack file, or REV:PATH")
    parser.add_argument("--json", action="store_true", help="print the diff as one JSON document")
    parser.add_argument("--old-tree", type=Path, help="plan OLD (relative to this checkout) with its own program")
    parser.add_argument("--snapshot", action="store_true", help=argparse.SUPPRESS)  # used by --old-tree
    args = parser.parse_args(argv)
    salt = bytes.fromhex(os.environ[SALT_ENV]) if SALT_ENV in os.environ else secrets.token_bytes(16)

    import tools.stackfile as stackfile
    from components.settings import ConfigError

    # With --snapshot this runs in an older checkout (--old-tree), whose stackfile may have no StackFileError.
    errors = (ConfigError, getattr(stackfile, "StackFileError", ConfigError))

    try:
        if args.snapshot:
            json.dump(_snapshot_of_text(*read_spec(args.old), salt, args.old), sys.stdout)
            return 0
        if args.new is None:
            parser.error("NEW is required")
        if args.old_tree:
            old = snapshot_in_tree(args.old_tree, args.old, salt)
        else:
            old = _snapshot_of_text(*read_spec(args.old), salt, args.old)
        new_text, new_name = read_spec(args.new)
        if new_text is None:
            print(f"plandiff: {args.new}: no such file", file=sys.stderr)
            return 2
        new = _snapshot_of_text(new_text, new_name, salt, args.new)
    except errors as e:
        print(f"plandiff: {e}", file=sys.stderr)
        return 2
    diff = compare(old, new)
    old_label = f"{args.old_tree}/{args.old}" if args.old_tree else args.old
    if args.json:
        json.dump({"old": old_label, "new": args.new, **diff}, sys.stdout, indent=2)
        print()
    else:
        print(format_diff(diff, old_label, args.new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
