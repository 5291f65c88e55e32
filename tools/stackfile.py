"""Read a Pulumi stack file (Pulumi.<stack>.yaml) the way the offline tools need it.

Only PyYAML: the post-deploy verifier uses this without the mock engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: about 10x faster on 500-mailbox configs


class StackFileError(ValueError):
    """The stack file cannot be read: missing, not YAML, or not shaped like a stack file. One line."""


def stack_name(stack_file: Path) -> str:
    name = stack_file.name
    if not (name.startswith("Pulumi.") and name.endswith(".yaml")) or name == "Pulumi.yaml":
        raise SystemExit(f"{stack_file}: expected a stack file named Pulumi.<stack>.yaml")
    return name[len("Pulumi."):-len(".yaml")]


def read_stack_document(stack_file: Path, text: str | None = None) -> dict[str, Any]:
    """The whole stack file as a mapping; StackFileError (one line naming the file) if it cannot be."""
    if text is None:
        try:
            text = stack_file.read_text()
        except FileNotFoundError:
            raise StackFileError(f"{stack_file}: no such file (copy an example stack file, see the README)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise StackFileError(f"{stack_file}: cannot be read: {e}") from None
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise StackFileError(f"{stack_file}: not valid YAML{where}: {problem}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or not isinstance(doc.get("config") or {}, dict):
        raise StackFileError(f"{stack_file}: must be a YAML mapping with a config: section of "
                             "orgmail:<setting>: <value> entries, like the example stack files")
    return doc


def load_stack_config(stack_file: Path, text: str | None = None) -> dict[str, Any]:
    """The stack file's config; encrypted (secure:) values cannot be read offline and are left out
    (encrypted_settings lists them)."""
    return _without_secure(read_stack_document(stack_file, text).get("config") or {})


def encrypted_settings(stack_file: Path, text: str | None = None) -> list[str]:
    """Every secure: value of the stack file, as `namespace:key` or `namespace:key.sub`, in file order."""
    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if _is_secure(value):
            found.append(where)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    for key, value in (read_stack_document(stack_file, text).get("config") or {}).items():
        walk(value, str(key))
    return found


def _is_secure(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"secure"}


def config_keys(stack_file: Path, text: str | None = None) -> set[str]:
    """Every key of the stack file's config, encrypted (secure:) ones included."""
    return set(read_stack_document(stack_file, text).get("config") or {})


def project_name(stack_file: Path) -> str:
    """The Pulumi project of a stack file: `name` in the Pulumi.yaml beside it ("orgmail" if none)."""
    project_file = stack_file.parent / "Pulumi.yaml"
    try:
        doc = yaml.load(project_file.read_text(), Loader=_Loader) if project_file.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        doc = None
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and name else "orgmail"


def _without_secure(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_secure(v) for k, v in value.items() if not _is_secure(v)}
    if isinstance(value, list):
        return [_without_secure(v) for v in value]
    return value
