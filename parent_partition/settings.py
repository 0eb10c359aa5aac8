"""Configuration sections as dataclasses: each field names its check, and one parser reads any section.

The parent's ``[parent]`` table and every device's own table (``[storage]``, and an array of tables such as
``[[storage.lun]]``) are parsed by ``parse_section`` from the dataclass a VSP declares as its ``Settings``,
so the config loader names no device. Errors name the file, the table and the key, and say what the value
must be.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
Check = Callable[[Any], Any]


class ConfigError(ValueError):
    """A setting (from the TOML file or a flag) is wrong; the message names it and says what it must be."""


def setting(default: Any = dataclasses.MISSING, *, check: Check, factory: Callable[[], Any] | None = None,
            required: str = "") -> Any:
    """A dataclass field read from TOML through ``check`` (which returns the value or raises ValueError
    saying what it must be). ``required`` is the hint shown when the key is missing."""
    meta = {"check": check, "required": required}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def tables(item: type[Any]) -> Any:
    """A field holding an array of tables (``[[section.key]]``), each parsed as ``item``."""
    return dataclasses.field(default_factory=list, metadata={"table": item})


@dataclasses.dataclass(slots=True)
class NoSettings:
    """A device with nothing to configure."""


def keys(cls: type[Any]) -> list[str]:
    """The keys of a section: its settings, then its arrays of tables."""
    return [f.name for f in dataclasses.fields(cls) if "check" in f.metadata or "table" in f.metadata]


def describe(name: str, cls: type[Any]) -> list[str]:
    """``[name] (key, ...)`` and one ``[[name.key]] (...)`` per array of tables, for ``--help``."""
    fields = dataclasses.fields(cls)
    out = [f"[{name}] ({', '.join(f.name for f in fields if 'check' in f.metadata)})"]
    out += [f"[[{name}.{f.name}]] ({', '.join(keys(f.metadata['table']))})" for f in fields if "table" in f.metadata]
    return out


def parse_section(cls: type[T], raw: Any, where: str, source: str, obj: T | None = None) -> T:
    """``cls`` from the TOML table ``raw``, found at ``where`` (``[storage]``, ``[[storage.lun]] #2``) in
    ``source``; updates ``obj`` instead when given. Unknown keys, wrong types and missing required keys are
    ConfigErrors."""
    here = f"{source}: {where}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{here} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if "check" in f.metadata or "table" in f.metadata}
    for name, spec in fields.items():
        if spec.metadata.get("required") and name not in raw:
            raise ConfigError(f"{here} needs {spec.metadata['required']}")
    target: Any = obj if obj is not None else cls()
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"{here} {key}: unknown setting; known: {', '.join(fields)}")
        item = f.metadata.get("table")
        if item is not None:
            table = where.strip("[]")
            if not isinstance(value, list):
                raise ConfigError(f"{here} {key} must be an array of tables ([[{table}.{key}]])")
            setattr(target, key, [parse_section(item, v, f"[[{table}.{key}]] #{i}", source)
                                  for i, v in enumerate(value, 1)])
            continue
        try:
            setattr(target, key, f.metadata["check"](value))
        except ValueError as exc:
            raise ConfigError(f"{here} {key}: {exc}") from None
    return target  # type: ignore[no-any-return]


# ---- checks of single values: each returns the value to store or raises ValueError("must be ...") -------

def flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {v!r}")
    return v


def text(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, not {v!r}")
    return v


def seconds(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
        raise ValueError(f"must be a positive number of seconds, not {v!r}")
    return float(v)


def seconds_or_zero(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
        raise ValueError(f"must be a number of seconds (0 or more), not {v!r}")
    return float(v)


def count(minimum: int = 1, maximum: int | None = None) -> Check:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum or (maximum is not None and v > maximum):
            limits = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise ValueError(f"must be an integer {limits}, not {v!r}")
        return v
    return check


def sectors(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 512:
        raise ValueError(f"must be a positive multiple of 512 bytes, not {v!r}")
    return v


def names(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ValueError(f'must be a list of partition names, as in ["vm1", "vm2"], not {v!r}')
    return v
