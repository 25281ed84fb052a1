"""One config path: YAML → dotted ``key=value`` overrides → a validated pydantic model.

Overrides use YAML scalars for values (``params.density=0.3`` gives a float, ``output.format=peft`` a string,
``adapters.1.weight=0.5`` indexes a list).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sst_merge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

#: What ``device_map`` accepts: the CLI's ``--device-map`` and the experiment config validate with it.
DEVICE_MAP_PATTERN = r"auto|cpu|cuda(:\d+)?"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; raise :class:`ConfigError` naming the file on a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: invalid YAML ({str(e).splitlines()[0]}); fix the syntax") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. params.density=0.3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a valid list index")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is not a mapping or list")
    return data


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate ``data`` into ``model``; turn pydantic's report into one line per problem, naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see the example configs)"
            problems.append(f"{loc}: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from e
