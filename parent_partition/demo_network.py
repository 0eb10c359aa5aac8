"""The demo's network workload: each VM pings the next through the parent's virtual switch.

Each child runs with ``--ping NEXT`` (vm1 → vm2 → vm3 → vm1): its built-in ARP/ICMP stack sends an echo
request every second through its own NetVSC, the parent's NetVSP and learning switch, and the other VM's
NetVSC, and logs each outcome (``ping reply`` with ``rtt_ms``, or ``ping lost``) as a JSON line, as fping -l
would print it. The parent runs with ``[network] stats_interval`` and logs ``switch counters`` (per port:
frames in and out, flooded, dropped by reason), as ``ip -s link`` shows a bridge's ports. This module only
reads those lines: the view shows per VM the latest round trip, replies/sent and loss since the work began,
and its switch port's counters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from child_partition.devices.network.ping import format_ms

Record = dict[str, Any]

PING_EVENTS = ("ping reply", "ping lost")
SWITCH_EVENT = "switch counters"
DETACH_EVENT = "NIC off the switch"
STATS_INTERVAL = 1.0  # the parent's [network] stats_interval in the demo


def ring(names: list[str]) -> dict[str, str]:
    """Who pings whom: each VM the next, the last the first."""
    return {name: names[(i + 1) % len(names)] for i, name in enumerate(names)} if len(names) > 1 else {}


@dataclass(slots=True)
class VmPings:
    """One VM's pings of its target: running totals from its log, and the totals when the work began."""

    name: str
    target: str
    sent: int = 0
    received: int = 0
    rtt_ms: float | None = None  # the latest reply's
    base: tuple[int, int] | None = (0, 0)  # the counts shown start from these; None: from the next outcome
    answered: bool = False  # its first answer in the work was told

    @property
    def shown(self) -> tuple[int, int]:
        """(sent, replies) since the work began."""
        if self.base is None:
            return 0, 0
        return self.sent - self.base[0], self.received - self.base[1]

    @property
    def loss(self) -> float:
        sent, replies = self.shown
        return (sent - replies) / sent if sent else 0.0


def port_drops(port: Record) -> int:
    return sum(int(v) for k, v in port.items() if k.startswith("port_dropped_"))


class NetworkWorkload:
    """Reads the children's ping lines and the parent's switch counters; ``say`` narrates a first answer."""

    title = "network"

    def __init__(self, pings: dict[str, str], say: Callable[[str, Text], None]) -> None:
        self.vms = {name: VmPings(name, target) for name, target in pings.items()}
        self.ports: dict[str, Record] = {}  # partition -> its port's counters, from the latest switch line
        self.switch: Record = {}
        self._say = say
        self._working = False
        self._told_path = False

    def on_record(self, rec: Record) -> bool:
        """Take a ping or switch-counters record (True: it is this workload's, nothing else needs it)."""
        event, who = rec.get("event"), rec.get("who")
        if event in PING_EVENTS and who in self.vms:
            self._ping(self.vms[who], rec)
            return True
        if event == SWITCH_EVENT and who == "parent":
            ports = rec.get("ports")
            if isinstance(ports, dict):
                self.ports.update({str(k): v for k, v in ports.items() if isinstance(v, dict)})
            switch = rec.get("switch")
            self.switch = switch if isinstance(switch, dict) else {}
            return True
        if event == DETACH_EVENT and who == "parent" and rec.get("partition") in self.vms:
            self._detached(str(rec["partition"]), rec)
            return True
        return False

    def _ping(self, vm: VmPings, rec: Record) -> None:
        try:
            sent, received = int(rec["sent"]), int(rec["received"])
            rtt = float(rec["rtt_ms"]) if rec["event"] == "ping reply" else vm.rtt_ms
        except (KeyError, TypeError, ValueError):
            return  # not a line this demo knows how to read: the counts stay as they were
        vm.sent, vm.received, vm.rtt_ms = sent, received, rtt
        if not self._working:
            return
        if vm.base is None:
            vm.base = (vm.sent, vm.received)
        if rec["event"] == "ping reply" and vm.rtt_ms is not None and not vm.answered:  # told once
            vm.answered = True
            text = Text.assemble(("answers ", "bold"), f"{vm.name}'s ping through the switch in ",
                                 (f"{format_ms(vm.rtt_ms / 1000)} ms", "bold"))
            if not self._told_path:
                self._told_path = True
                text.append(f"  ({vm.name}'s NetVSC → the parent's NetVSP → the switch → {vm.target}'s NetVSC, "
                            "and back)", style="dim")
            self._say(vm.target, text)

    def _detached(self, name: str, rec: Record) -> None:
        """A VM's NIC left the switch: its port's final counters, in one line."""
        try:
            line = (f"{name}'s NIC off the switch: {int(rec['port_rx_frames']):,} frames to it, "
                    f"{int(rec['port_tx_frames']):,} from it, {int(rec['port_rx_flooded']):,} flooded, "
                    f"{port_drops(rec):,} dropped")
        except (KeyError, TypeError, ValueError):
            line = f"{name}'s NIC off the switch"
        self._say("parent", Text(line))

    async def start(self) -> None:
        """Count from now on: each VM's counts start at its first outcome from here (the request behind it may
        have left while the other VMs were still starting, and is not the network's)."""
        for vm in self.vms.values():
            vm.base = None
        self._working = True

    def sample(self) -> None:
        """Nothing to poll: the counts come with the log lines."""

    def view(self) -> Group:
        caption = Text("network: each VM pings the next through the parent's switch once a second; frames as "
                       "the VM's switch port counts them", style="bold")
        t = Table(header_style="bold")
        t.add_column("VM")
        t.add_column("pings")
        for col in ("last RTT", "replies/sent", "loss", "to switch", "from switch", "flooded", "dropped"):
            t.add_column(col, justify="right")
        for vm in self.vms.values():
            sent, replies = vm.shown
            port = self.ports.get(vm.name, {})
            loss = f"{vm.loss:.0%}" if sent else "-"
            t.add_row(vm.name, f"→ {vm.target}", f"{format_ms(vm.rtt_ms / 1000)} ms" if vm.rtt_ms is not None else "-",
                      f"{replies}/{sent}", f"[bold red]{loss}[/]" if replies < sent - 1 else loss,
                      *(f"{int(port[k]):,}" if k in port else "-"
                        for k in ("port_rx_frames", "port_tx_frames", "port_rx_flooded")),
                      f"{port_drops(port):,}" if port else "-")
        return Group(caption, t)

    def progress(self) -> list[tuple[str, Text]]:
        """One line per VM, for output that is not a terminal."""
        out = []
        for vm in self.vms.values():
            sent, replies = vm.shown
            rtt = f"{vm.rtt_ms:.3f}ms" if vm.rtt_ms is not None else "-"
            port = self.ports.get(vm.name, {})
            switch = (f" to_switch={port.get('port_rx_frames', 0)} from_switch={port.get('port_tx_frames', 0)} "
                      f"dropped={port_drops(port)}") if port else ""
            out.append((vm.name, Text(f"ping {vm.target}: rtt={rtt} replies={replies}/{sent} "
                                      f"loss={vm.loss:.0%}{switch}")))
        return out

    async def stop(self) -> None:
        """The children stop pinging as they unload."""
