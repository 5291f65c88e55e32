"""SSM parameters too big for one: a value stored as numbered parts that orgmail-sync joins in order."""

from __future__ import annotations

import functools

import pulumi
import pulumi_aws as aws

# Standard SSM parameters hold at most 4 KB (4096 bytes); larger values are split into numbered parts.
# Every value stored so is JSON from json.dumps, whose output is ASCII: 4000 characters are 4000 bytes.
SSM_PART_BYTES = 4000


def split_parts(value: str, size: int = SSM_PART_BYTES) -> list[str]:
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def part_count(size_hint: int) -> int:
    return max(1, -(-size_hint // SSM_PART_BYTES))


def part_value(value: str, index: int, count: int, path: str) -> str:
    """Part `index` of `count` of `value`; "-" for an unused part (SSM refuses empty values)."""
    parts = split_parts(value)
    if len(parts) > count:
        raise ValueError(f"{path}: {len(value)} bytes do not fit in {count} parameter(s)")
    return (parts + [""] * count)[index] or "-"


def part_name(path: str, index: int) -> str:
    return f"{path}/part-{index:03d}"


def parts_of(path: str, value: str) -> dict[str, str]:
    """A value known now, as its parameters (name -> part): what stored_in_parts stores for it."""
    count = part_count(len(value))
    return {part_name(path, i): part_value(value, i, count, path) for i in range(count)}


def stored_in_parts(name: str, path: str, value: pulumi.Output[str], size_hint: int, kind: str,
                    description: str, tags: dict[str, str], parent: pulumi.Resource) -> list[aws.ssm.Parameter]:
    """Store `value` as parameters path/part-000, part-001, ... (joined in order by the host).

    The number of parts is fixed at plan time from `size_hint`, an upper bound of the length.
    """
    count = part_count(size_hint)
    return [aws.ssm.Parameter(
        f"{name}-{i:03d}", name=part_name(path, i), type=kind,
        value=value.apply(functools.partial(part_value, index=i, count=count, path=path)),
        description=f"{description} (part {i + 1} of {count})", tags=tags,
        opts=pulumi.ResourceOptions(parent=parent)) for i in range(count)]
