"""Tier 3: the VMBus versions a real child offers, and what it does at each (vmbus-core.md §3, §4.1)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from parent_partition.devices.network.settings import NetworkSettings
from vmbus_proto.devices import registry

from .conftest import Parent, child

pytestmark = pytest.mark.integration


def test_child_asked_for_6_0_negotiates_it_and_traces_supported_features(parent: Parent, workdir: Path) -> None:
    vm = child(workdir, parent.unix, "vm1", "--trace", "--vmbus-max-version", "6.0")
    vm.wait_event("all offered channels open")
    assert vm.events("VMBus negotiated")[0]["version"] == "6.0"
    (response,) = [r["event"] for r in vm.lines if "CHANNELMSG_VERSION_RESPONSE" in r["event"]]
    assert "supported_features=0x0" in response, response  # VersionResponse2 answers 6.0
    assert vm.stop() == 0


def test_child_at_2_4_closes_without_unload(parent: Parent, workdir: Path) -> None:
    """Linux vmbus_initiate_unload sends nothing below 3.0: the child closes its channels, then its connection."""
    vm = child(workdir, parent.tcp, "vm1", "--trace", "--vmbus-version", "2.4")
    ready = vm.wait_event("all offered channels open")
    assert vm.events("VMBus negotiated")[0]["version"] == "2.4"
    assert ready["versions"]["video"] == "3.2", "hyperv_fb offers only 3.2 at VMBus 2.4"
    vm.wait_event("NIC queues")  # sub-channels exist from VMBus 2.4 (WIN8) on
    (contact,) = [r["event"] for r in vm.lines if "CHANNELMSG_INITIATE_CONTACT" in r["event"]]
    assert "interrupt_page=0x0 " not in contact and "monitor_page1=0x0 " not in contact, contact
    (response,) = [r["event"] for r in vm.lines if "CHANNELMSG_VERSION_RESPONSE" in r["event"]]
    assert "supported_features" not in response, response
    assert vm.stop(signal.SIGINT) == 0
    assert not [r for r in vm.lines if "CHANNELMSG_UNLOAD" in r["event"]], "a 2.4 guest sent UNLOAD"
    gone = parent.wait_event("partition disconnected", partition="vm1")
    assert gone["channels_released"] == 0  # every channel was closed before the connection went
    assert len(parent.events("channel closed")) == len(registry.ALL) + NetworkSettings().subchannels
