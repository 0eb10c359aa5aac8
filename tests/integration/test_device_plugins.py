"""Tier 3: a device plug-in between a real parent and a real child: the parent's config names the VSP file,
the child's --device-plugin the VSC file, and the device is offered, opened and served like a built-in one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.device_plugin_files import write_plugin

from .conftest import Parent, child

pytestmark = pytest.mark.integration


def test_a_plugin_device_is_offered_opened_and_served(workdir: Path) -> None:
    vsp_ref, vsc_ref = write_plugin(workdir / "beat2")
    p = Parent(workdir / "parent", f'[parent]\ndevice_plugins = ["{vsp_ref}"]\n[beat2]\ninterval = 0.2\n')
    try:
        vm = child(workdir, p.tcp, "vm1", "--device-plugin", vsc_ref)
        ready = vm.wait_event("all offered channels open")
        assert ready["versions"].get("beat2") == "3.0", ready
        p.wait_event("device protocol negotiated", partition="vm1", device="beat2", version="3.0")
        p.wait_event("heartbeat started", partition="vm1", device="beat2")
        assert vm.stop() == 0
    finally:
        p.stop()


@pytest.mark.parametrize(("cls", "event"), [("BrokenHandshakeVsc", "device driver raised during attach"),
                                             ("BrokenRunVsc", "device driver failed; the device has stopped")])
def test_a_drivers_bug_costs_its_device_not_the_partition(workdir: Path, cls: str, event: str) -> None:
    vsp_ref, _ = write_plugin(workdir / "beat2")
    p = Parent(workdir / "parent", f'[parent]\ndevice_plugins = ["{vsp_ref}"]\n[beat2]\ninterval = 0.2\n')
    try:
        vm = child(workdir, p.tcp, "vm1", "--device-plugin", f"{workdir / 'beat2' / 'broken.py'}:{cls}")
        failed = vm.wait_event(event)
        assert "RuntimeError: a bug in the" in failed.get("exception", "") + failed.get("error", ""), failed
        vm.wait_event("device ready", device="storage")  # the other devices carry on
        vm.wait_event("device ready", device="network")
        assert vm.proc.poll() is None, "the partition ended with its driver"
        assert vm.stop() == 0
    finally:
        p.stop()
