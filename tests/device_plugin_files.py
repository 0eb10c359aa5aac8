"""A device plug-in written to files, for the plug-in tests: the heartbeat IC under another name and class
GUID ("beat2"), its VSP and VSC in two files of one folder sharing a third (``from . import spec``)."""

from __future__ import annotations

from pathlib import Path

SPEC = '''
import dataclasses, uuid
from vmbus_proto.devices.heartbeat import protocol
SPEC = dataclasses.replace(protocol.SPEC, name="beat2", class_id=uuid.UUID("0a0b0c0d-0000-4000-8000-000000000001"))
'''
VSP = '''
from parent_partition.devices.heartbeat.vsp import HeartbeatVsp
from . import spec
class Beat2Vsp(HeartbeatVsp):
    spec = spec.SPEC
'''
VSC = '''
from child_partition.devices.heartbeat.vsc import HeartbeatVsc
from . import spec
class Beat2Vsc(HeartbeatVsc):
    spec = spec.SPEC
'''

#: Drivers with a bug: one raises in its handshake, one in its steady state (after the handshake).
BROKEN_VSC = '''
from child_partition.devices.heartbeat.vsc import HeartbeatVsc
from . import spec
class BrokenHandshakeVsc(HeartbeatVsc):
    spec = spec.SPEC
    async def handshake(self, channel):
        raise RuntimeError("a bug in the handshake")
class BrokenRunVsc(HeartbeatVsc):
    spec = spec.SPEC
    async def run(self, channel):
        await channel.recv()
        raise RuntimeError("a bug in the steady state")
'''


def write_plugin(folder: Path) -> tuple[str, str]:
    """The plug-in's files in ``folder``; its VSP and VSC references."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("spec", SPEC), ("vsp", VSP), ("vsc", VSC), ("broken", BROKEN_VSC)):
        (folder / f"{name}.py").write_text(text)
    return f"{folder / 'vsp.py'}:Beat2Vsp", f"{folder / 'vsc.py'}:Beat2Vsc"
