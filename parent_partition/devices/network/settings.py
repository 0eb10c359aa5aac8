"""The ``[network]`` section: the synthetic NIC every partition gets and the virtual switch joining them
(Hyper-V's per-VM network adapter on a virtual switch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmbus_proto.aio.tap import IFNAMSIZ

from ...settings import count, flag, seconds_or_zero, setting


def _mac_style(v: Any) -> str:
    if v not in ("local", "hyperv"):
        raise ValueError(f"must be 'local' (02:xx:..., locally administered) or 'hyperv' (00:15:5d:...), not {v!r}")
    return str(v)


def _ifname(v: Any) -> str:
    if not isinstance(v, str) or (v and (len(v.encode()) >= IFNAMSIZ or "/" in v or any(c.isspace() for c in v))):
        raise ValueError(f"must be an interface name of 1..{IFNAMSIZ - 1} bytes without '/' or spaces "
                         f"(or \"\" for none), not {v!r}")
    return v


@dataclass(slots=True)
class NetworkSettings:
    mtu: int = setting(1500, check=count(576, 9000))  # the switch's MTU (the guest's NDIS_CONFIG asks for MTU + 14)
    link_speed_mbps: int = setting(10_000, check=count(10))  # what OID_GEN_LINK_SPEED reports
    mac_style: str = setting("local", check=_mac_style)  # how a partition's MAC is made from its name
    # A partition may send frames from MACs other than its NIC's (Hyper-V "Enable MAC address spoofing").
    mac_spoofing: bool = setting(False, check=flag)
    port_queue_frames: int = setting(1024, check=count(16))  # frames waiting for a partition before drops
    # NVSP sub-channels a NIC may have (RSS queues = this + 1; OpenVMM's default 4 queues); 0: one channel.
    subchannels: int = setting(3, check=count(0, 63))
    # A TAP device on the parent's host joined to the switch (Hyper-V's external virtual switch); "" for none.
    external_tap: str = setting("", check=_ifname)
    # Seconds between "switch counters" log lines (per-port frames, floods, drops) while they change; 0: none.
    stats_interval: float = setting(0.0, check=seconds_or_zero)
