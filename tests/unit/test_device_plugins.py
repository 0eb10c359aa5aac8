"""Device plug-ins (vmbus_proto.devices.plugins): a VSP or VSC class from a file, checked, with one clear
error for each way a reference can be wrong; the parent's config and the child's command line take them."""

from __future__ import annotations

from pathlib import Path

import pytest

from child_partition.cli import build_parser
from child_partition.devices import load_vsc_plugin
from parent_partition.config import Config, ConfigError
from parent_partition.devices import load_vsp_plugin
from parent_partition.devices.heartbeat.vsp import HeartbeatVsp
from tests.device_plugin_files import write_plugin
from vmbus_proto.devices.plugins import PluginError, load_plugin


def test_a_plugin_from_files_loads_with_relative_imports(tmp_path: Path) -> None:
    vsp_ref, vsc_ref = write_plugin(tmp_path / "beat2")
    vsp, vsc = load_vsp_plugin(vsp_ref), load_vsc_plugin(vsc_ref)
    assert vsp.spec.name == vsc.spec.name == "beat2"
    assert vsp.spec.class_id == vsc.spec.class_id and issubclass(vsp, HeartbeatVsp)
    assert load_plugin("parent_partition.devices.heartbeat.vsp:HeartbeatVsp") is HeartbeatVsp


@pytest.mark.parametrize(("ref", "why"), [
    ("nocolon", "expected FILE.py:Class"),
    ("{d}/missing.py:X", "does not exist"),
    ("{d}:X", "is not a Python file"),
    ("{d}/notes.txt:X", "is not a Python file"),
    ("{d}/broken.py:X", "SyntaxError"),
    ("{d}/raises.py:X", "RuntimeError: boom (raises.py:1)"),
    ("{d}/empty.py:X", "defines no 'X'"),
    ("no_such_module_xyz:X", "no module named 'no_such_module_xyz'"),
])
def test_each_bad_reference_gets_one_clear_error(tmp_path: Path, ref: str, why: str) -> None:
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(PluginError, match=why.replace("(", r"\(").replace(")", r"\)")):
        load_plugin(ref.format(d=tmp_path))


def test_a_plugin_must_be_the_right_side_and_a_new_device(tmp_path: Path) -> None:
    vsp_ref, vsc_ref = write_plugin(tmp_path / "beat2")
    with pytest.raises(PluginError, match="is not a VSP class"):
        load_vsp_plugin(vsc_ref)
    with pytest.raises(PluginError, match="is not a VSC class"):
        load_vsc_plugin(vsp_ref)
    with pytest.raises(PluginError, match="device name 'heartbeat' is a built-in device's"):
        load_vsp_plugin("parent_partition.devices.heartbeat.vsp:HeartbeatVsp")


def test_the_parent_config_offers_plugins_with_their_section(tmp_path: Path) -> None:
    vsp_ref, _ = write_plugin(tmp_path / "beat2")
    cfg_file = tmp_path / "p.toml"
    cfg_file.write_text(f'[parent]\ndevice_plugins = ["{vsp_ref}"]\n[beat2]\ninterval = 0.5\n')
    cfg = Config.load(str(cfg_file))
    assert cfg.devices["beat2"] is True and cfg.section("beat2").interval == 0.5
    assert cfg.vsp_classes()["beat2"].spec.name == "beat2"
    cfg_file.write_text('[parent]\ndevice_plugins = ["nowhere/vsp.py:V"]\n')
    with pytest.raises(ConfigError, match=r"\[parent\] device_plugins: device plug-in .*does not exist"):
        Config.load(str(cfg_file))
    cfg_file.write_text("[beat2]\ninterval = 0.5\n")  # no plug-in: no such section
    with pytest.raises(ConfigError, match=r"\[beat2\]: unknown section"):
        Config.load(str(cfg_file))


def test_the_child_command_line_takes_plugins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, vsc_ref = write_plugin(tmp_path / "beat2")
    args = build_parser().parse_args(["run", "--connect", "tcp://127.0.0.1:1", "--device-plugin", vsc_ref])
    assert [c.spec.name for c in args.plugins] == ["beat2"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--connect", "tcp://127.0.0.1:1", "--device-plugin", "x/y.py:Z"])
    assert "does not exist" in capsys.readouterr().err
