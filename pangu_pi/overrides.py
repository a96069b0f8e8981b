"""`--set KEY=VALUE`, taken and read the same way by every command that has it; config trees as
YAML.

KEY is a dotted path into the config (`optim.lr`, `model.hidden_size`); VALUE is read as YAML, so
numbers, booleans, lists and `null` come out typed (`--set "data.datasets=[{path: d, weight: 2}]"`).
Several pairs may follow one flag, and the flag may repeat: `--set a=1 b=2` and `--set a=1 --set b=2`
are the same (`add_set_argument`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from .config import ConfigError


def parse_override(item: str) -> dict:
    """`a.b.c=value` → {"a": {"b": {"c": value}}}."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE; write e.g. --set optim.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r} has an empty key; write e.g. --set optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` laid over `base`, section by section (a later value replaces an earlier one)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The `--set` flag: several KEY=VALUE pairs after one flag, the flag as often as wanted, in order."""
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)


def yaml_text(data: dict) -> str:
    """YAML as the project writes it (run configs, model cards): keys in the order given, so a file
    reads section by section as the config defines them; Unicode as it is."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_yaml(data: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml_text(data), encoding="utf-8")


def apply_overrides(values: dict, items: list[str]) -> dict:
    for item in items:
        values = deep_merge(values, parse_override(item))
    return values
