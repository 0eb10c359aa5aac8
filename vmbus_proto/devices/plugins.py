"""Device plug-ins: a VSP or VSC class that lives outside the project's packages, named by the user.

A reference is ``path/to/file.py:Class`` (a Python file, relative to the working directory) or
``package.module:Class`` (an importable module), what the registry's own ``module:Class`` lines are. A file is
imported as a module of a private package for its directory, so files side by side import each other
relatively (``from . import timesync``), the way a driver's files in one kernel module directory share
their headers. The parent checks that a VSP reference names a ``Vsp`` (``parent_partition.devices``), the
child that a VSC reference names a ``Vsc`` (``child_partition.devices``); this module only imports.

Every failure is one ``PluginError`` naming the reference and what is wrong with it: no such file, not a
``.py`` file, a module that raises on import (its exception, and where), or no such attribute.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
import types
from pathlib import Path

from .base import DeviceSpec
from .registry import BY_CLASS, BY_NAME

__all__ = ["PluginError", "check_plugin_spec", "load_plugin"]


class PluginError(ValueError):
    """A device plug-in reference that cannot be loaded; the message says which and why."""


def load_plugin(ref: str) -> object:
    """The attribute ``ref`` names: ``file.py:Attr`` or ``package.module:Attr``."""
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr.isidentifier():
        raise PluginError(f"device plug-in {ref!r}: expected FILE.py:Class or package.module:Class")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        name = _file_module(ref, Path(module_part))
    else:
        name = module_part
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise PluginError(f"device plug-in {ref!r}: no module named {exc.name!r}") from None
        raise PluginError(f"device plug-in {ref!r}: cannot import it: {_why(exc)}") from None
    except Exception as exc:  # the plug-in's own code raised while importing
        raise PluginError(f"device plug-in {ref!r}: cannot import it: {_why(exc)}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"device plug-in {ref!r}: {module_part} defines no {attr!r}") from None


def _file_module(ref: str, path: Path) -> str:
    """Make ``path``'s directory a private package (once) and return the module name of ``path`` in it."""
    if path.suffix != ".py":
        raise PluginError(f"device plug-in {ref!r}: {path} is not a Python file (.py)")
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise PluginError(f"device plug-in {ref!r}: {path} {what}")
    if not path.stem.isidentifier():
        raise PluginError(f"device plug-in {ref!r}: {path.name} is not a Python module name")
    directory = path.resolve().parent
    package = "_vmbus_plugin_" + hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    if package not in sys.modules:
        pkg = types.ModuleType(package, f"device plug-ins in {directory}")
        pkg.__path__ = [str(directory)]
        pkg.__spec__ = importlib.util.spec_from_loader(package, None, is_package=True)
        assert pkg.__spec__ is not None
        pkg.__spec__.submodule_search_locations = [str(directory)]
        sys.modules[package] = pkg
    return f"{package}.{path.stem}"


def _why(exc: BaseException) -> str:
    """An import failure as one line: the exception and the plug-in line it came from."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "_bootstrap" not in f.filename]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({Path(exc.filename).name}:{exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def check_plugin_spec(ref: str, cls: type) -> DeviceSpec:
    """The ``spec`` of a plug-in's VSP or VSC class: a DeviceSpec whose name and class GUID are not a
    registered device's (a plug-in adds a device; it does not replace one)."""
    spec = getattr(cls, "spec", None)
    if not isinstance(spec, DeviceSpec):
        raise PluginError(f"device plug-in {ref!r}: {cls.__name__}.spec is not a DeviceSpec")
    if spec.name in BY_NAME:
        raise PluginError(f"device plug-in {ref!r}: device name {spec.name!r} is a built-in device's")
    if spec.class_id in BY_CLASS:
        raise PluginError(f"device plug-in {ref!r}: class GUID {spec.class_id} is the built-in "
                          f"{BY_CLASS[spec.class_id].name} device's")
    return spec
