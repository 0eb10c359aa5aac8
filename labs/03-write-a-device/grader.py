"""Lab 3's grader: your timesync device, from its bytes to two real child partitions (labs/README.md).

The codec steps check byte vectors built from the real layouts (Linux ``struct ictimesync_data`` and
``ictimesync_ref_data``, padded as OpenVMM sends them); the handshake steps pit your guest and host against
the project's IC framework; the partition steps run a real parent with your VSP (its clock 3600 s ahead) and
two real children with your VSC, and one child against the grader's faulty host (faults.py).
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

from labs.harness import Context, Failed, Lab, Proc, Step, child, driver_failed, parent
from labs.harness import answers as read_answers
from vmbus_proto.devices.base import Incoming
from vmbus_proto.devices.heartbeat import ic
from vmbus_proto.errors import DeviceProtocolError
from vmbus_proto.packets import PacketType

LAB_DIR = Path(__file__).resolve().parent
V1, V3, V4 = ic.version(1, 0), ic.version(3, 0), ic.version(4, 0)
T = 133444736000000000  # 2023-11-14 22:13:20 UTC in 100 ns ticks since 1601
OFFSET = 3600.0
TOLERANCE = 5.0
INBAND = PacketType.DATA_INBAND
OTHERS_OFF = "[devices]\n" + "".join(f"{d} = false\n" for d in
                                       ("storage", "network", "video", "keyboard", "mouse", "heartbeat"))


def _equal(what: str, got: object, want: object) -> None:
    if got != want:
        raise Failed(f"{what}: got {got!r}, expected {want!r}")


def _raises(what: str, fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except DeviceProtocolError:
        return
    raise Failed(f"{what} should raise DeviceProtocolError")


def codec(ctx: Context) -> None:
    ts = ctx.load("timesync")
    _equal("to_wintime(1700000000)", ts.to_wintime(1_700_000_000), T)
    _equal("from_wintime(133444736000000000)", ts.from_wintime(T), 1_700_000_000.0)
    data = bytes.fromhex("00006dc64717da010000000000000000393000000000000002000000")
    _equal("TimesyncData(T, 0, 12345, SAMPLE).pack()", ts.TimesyncData(T, 0, 12345, 2).pack().hex(), data.hex())
    _equal("TimesyncData.unpack of Linux's 25 bytes", ts.TimesyncData.unpack(data[:25]),
           ts.TimesyncData(T, 0, 12345, 2))
    _raises("TimesyncData.unpack of 24 bytes", ts.TimesyncData.unpack, data[:24])
    ref = bytes.fromhex("00006dc64717da0155443322110000000100030000000000")
    _equal("TimesyncRefData(T, 0x1122334455, SYNC, 0, 3).pack()",
           ts.TimesyncRefData(T, 0x1122334455, 1, 0, 3).pack().hex(), ref.hex())
    _equal("TimesyncRefData.unpack of Linux's 22 bytes", ts.TimesyncRefData.unpack(ref[:22]),
           ts.TimesyncRefData(T, 0x1122334455, 1, 0, 3))
    _raises("TimesyncRefData.unpack of 21 bytes", ts.TimesyncRefData.unpack, ref[:21])
    packet = ("010000002c000000" "03000000" "0400" "04000000" "1800" "00000000" "00" "03" "0000"
              + ref[:17].hex() + "00" * 7)
    _equal("encode_timesync(TimesyncRefData(T, 0x1122334455, SYNC), framework 3.0, timesync 4.0)",
           ts.encode_timesync(ts.TimesyncRefData(T, 0x1122334455, 1), V3, V4).hex(), packet)
    _equal("decode_timesync(body, 4.0)", ts.decode_timesync(ref, V4), ts.TimesyncRefData(T, 0x1122334455, 1, 0, 3))
    _equal("decode_timesync(body, 3.0)", ts.decode_timesync(data, V3), ts.TimesyncData(T, 0, 12345, 2))


def _guest_pair(ts: ModuleType, host_versions: tuple[int, ...], clock: float) -> tuple[object, object]:
    """The framework's host NEGOTIATE against your VscHandshake, whose guest reads ``clock``."""
    host = ic.IcHostNegotiation("timesync", host_versions)
    vsc = ts.VscHandshake()
    vsc.guest.clock, vsc.guest.ref_clock = (lambda: clock), (lambda: 5_000)
    _equal("what VscHandshake.start() sends (the host speaks first)", vsc.start(), [])
    answer = vsc.receive(Incoming(INBAND, 0, False, host.start()[0].payload))
    if len(answer) != 1:
        raise Failed(f"VscHandshake answered the NEGOTIATE with {len(answer)} packets, not 1")
    host.receive(Incoming(INBAND, 0, False, answer[0].payload))
    return host, vsc


def guest_handshake(ctx: Context) -> None:
    ts = ctx.load("timesync")
    host, vsc = _guest_pair(ts, (V1, V3, V4), clock=1_700_000_000.0 - OFFSET)
    if not (host.done and vsc.done):  # type: ignore[attr-defined]
        raise Failed("the framework's host and your VscHandshake did not both finish the NEGOTIATE")
    _equal("service version chosen (host offers 1.0, 3.0, 4.0)", vsc.negotiated_version, V4)  # type: ignore[attr-defined]
    _equal("framework version chosen", host.framework_version, V3)  # type: ignore[attr-defined]
    _, old_vsc = _guest_pair(ts, (V1,), clock=0.0)
    _equal("service version chosen (host offers 1.0 only)", old_vsc.negotiated_version, V1)  # type: ignore[attr-defined]
    # A 4.0 SYNC read 2 ms (20000 ticks) after the host sampled its clock: host time T + 2 ms.
    body = bytes.fromhex("00006dc64717da01" "704e000000000000" "01000000000000")[:22] + bytes(2)
    header = ic.IcHeader(V3, ic.IcMessageType.TIMESYNC, V4, len(body),
                         flags=ic.IcFlags.TRANSACTION | ic.IcFlags.REQUEST)
    vsc.guest.ref_clock = lambda: 0x4E70 + 20_000  # type: ignore[attr-defined]
    out = vsc.guest.answer(Incoming(INBAND, 7, False, ic.pack_ic(header, body)))  # type: ignore[attr-defined]
    if out is None:
        raise Failed("your guest did not answer a well-formed 4.0 SYNC")
    got, _ = ic.unpack_ic(out.payload)
    _equal("the answer's icflags", got.flags, ic.IcFlags.TRANSACTION | ic.IcFlags.RESPONSE)
    _equal("the answer's status", got.status, ic.HV_S_OK)
    _equal("the answer's transaction id (the request's)", out.trans_id, 7)
    sample = vsc.guest.samples[-1]  # type: ignore[attr-defined]
    if abs(sample.offset - (OFFSET + 0.002)) > 1e-6:
        raise Failed(f"offset from a SYNC 3600 s ahead, read 2 ms later: {sample.offset!r}, expected 3600.002 "
                     "(parenttime + (ref_clock() - vmreferencetime), minus clock())")
    short = ic.IcHeader(V3, ic.IcMessageType.TIMESYNC, V4, 5, flags=ic.IcFlags.TRANSACTION | ic.IcFlags.REQUEST)
    if vsc.guest.answer(Incoming(INBAND, 8, False, ic.pack_ic(short, b"\x01" * 5))) is not None:  # type: ignore[attr-defined]
        raise Failed("your guest answered a 5-byte TIMESYNC body; Linux drops it unanswered")
    if not vsc.guest.dropped:  # type: ignore[attr-defined]
        raise Failed("your guest dropped a 5-byte TIMESYNC without saying why in guest.dropped")


def host_exchange(ctx: Context) -> None:
    ts = ctx.load("timesync")
    host = ts.TimesyncHost(interval=5.0, clock=lambda: T, ref_clock=lambda: 0x4E70)
    request = bytearray(host.start(0.0)[0].payload)
    ic.prep_negotiate_resp(request, ic.UTIL_FW_VERSIONS, (V4, V3, V1))  # Linux's answer, in place
    request[ic.PIPE_HEADER.size + 17] = ic.IcFlags.TRANSACTION | ic.IcFlags.RESPONSE
    outs = host.receive(Incoming(INBAND, 0, False, bytes(request)), 1.0)
    if len(outs) != 1:
        raise Failed(f"after the NEGOTIATE answer your host sent {len(outs)} packets, expected the SYNC")
    header, body = ic.unpack_ic(outs[0].payload)
    _equal("the SYNC's message type", header.message_type, ic.IcMessageType.TIMESYNC)
    _equal("the SYNC's versions (framework, timesync)", (header.framework_version, header.message_version), (V3, V4))
    _equal("the SYNC's icflags", header.flags, ic.IcFlags.TRANSACTION | ic.IcFlags.REQUEST)
    _equal("the SYNC's body (ictimesync_ref_data, flags SYNC)", body[:22].hex(),
           "00006dc64717da01704e0000000000000100" + "00" * 4)
    answer = bytearray(outs[0].payload)
    answer[ic.PIPE_HEADER.size + 17] = ic.IcFlags.TRANSACTION | ic.IcFlags.RESPONSE
    _equal("what answering the SYNC sends", host.receive(Incoming(INBAND, 0, False, bytes(answer)), 1.5), [])
    _equal("answers() after the SYNC's answer (flags, round trip)", host.answers(), [(1, 0.5)])
    _equal("handle_timer before the interval", host.handle_timer(3.0), [])
    sample = host.handle_timer(6.5)
    if len(sample) != 1:
        raise Failed("handle_timer after the interval did not send a SAMPLE")
    _, body = ic.unpack_ic(sample[0].payload)
    _equal("the SAMPLE's flags byte", body[16], 2)
    _equal("handle_timer while the SAMPLE is unanswered", host.handle_timer(12.0), [])
    bad = bytearray(sample[0].payload)  # a failure status is the guest's "no"
    bad[ic.PIPE_HEADER.size + 17] = ic.IcFlags.TRANSACTION | ic.IcFlags.RESPONSE
    bad[ic.PIPE_HEADER.size + 12] = 0x05
    _raises("receive() of an answer with a failure status", host.receive, Incoming(INBAND, 0, False, bytes(bad)), 13.0)


# ---- real partitions: one parent with your VSP, two children with your VSC, shared by three steps ------------

class Session:
    def __init__(self, ctx: Context) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="lab3-session-"))
        self.stack = contextlib.ExitStack()
        config = (f'[parent]\ndevice_plugins = ["{ctx.code / "vsp.py"}:TimesyncVsp"]\n{OTHERS_OFF}'
                  f"[timesync]\ninterval = 0.5\noffset = {OFFSET}\n")
        self.parent, url = self.stack.enter_context(parent(self.tmp, config=config))
        self.children = [child(self.tmp, url, name, "--trace", "--device-plugin", f"{ctx.code / 'vsc.py'}:TimesyncVsc")
                         for name in ("vm1", "vm2")]
        for c in self.children:
            self.stack.callback(c.interrupt)
        atexit.register(self.close)

    def close(self) -> None:
        self.stack.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


_sessions: dict[Path, Session] = {}


def session(ctx: Context) -> Session:
    if ctx.code not in _sessions:
        _sessions[ctx.code] = Session(ctx)
    return _sessions[ctx.code]


def offers(ctx: Context) -> None:
    s = session(ctx)
    for c in s.children:
        c.wait_for("if_type=9527e630-d0ae-497b-adce-e80ab0175caf", 60)
        c.wait_for("device ready", 60)
        out = c.output()
        if not re.search(r"device ready .*device=timesync version=4\.0", out):
            raise Failed(f"{c.log.stem}: no 'device ready ... device=timesync version=4.0' line")
    for name in ("vm1", "vm2"):
        _wait_line(s.parent, rf"device protocol negotiated .*partition={name} .*device=timesync")


def _wait_line(proc: Proc, pattern: str, count: int = 1, timeout: float = 60.0) -> list[re.Match[str]]:
    import time  # noqa: PLC0415
    deadline = time.monotonic() + timeout
    while True:
        found = list(re.finditer(pattern, proc.output()))
        if len(found) >= count:
            return found
        driver_failed(proc.output(), f"{count} lines matching {pattern!r}")
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise Failed(f"{proc.log.stem} logged {len(found)} lines matching {pattern!r}, expected {count}; "
                         f"its last lines:\n" + "\n".join(proc.output().splitlines()[-8:]))
        time.sleep(0.05)


def _offsets(proc: Proc, what: str, count: int, want: float) -> None:
    for m in _wait_line(proc, rf"\] {what} +.*offset=(-?[\d.]+)", count):
        if abs(float(m.group(1)) - want) > TOLERANCE:
            raise Failed(f"{proc.log.stem} reported {what} offset={m.group(1)}; the host's clock is {want:g} s ahead")


def sync(ctx: Context) -> None:
    s = session(ctx)
    for c in s.children:
        _offsets(c, "time sync", 1, OFFSET)
    for name in ("vm1", "vm2"):
        _wait_line(s.parent, rf"time sync answered .*partition={name} ")


def samples(ctx: Context) -> None:
    s = session(ctx)
    for c in s.children:
        _offsets(c, "time sample", 3, OFFSET)
    for name in ("vm1", "vm2"):
        _wait_line(s.parent, rf"time sample answered .*partition={name} ", 3)
    for c in s.children:
        if c.popen.poll() is not None:
            raise Failed(f"{c.log.stem} exited {c.popen.returncode}")


def malformed(ctx: Context) -> None:
    config = f'[parent]\ndevice_plugins = ["{LAB_DIR / "faults.py"}:FaultyTimesyncVsp"]\n{OTHERS_OFF}'
    with parent(ctx.tmp, config=config) as (_, url):
        c = child(ctx.tmp, url, "vm1", "--device-plugin", f"{ctx.code / 'vsc.py'}:TimesyncVsc")
        try:
            _wait_line(c, r"\[warning *\] timesync packet dropped")
            _offsets(c, "time sync", 1, 7200.0)
            if c.popen.poll() is not None:
                raise Failed(f"the child exited {c.popen.returncode} after the malformed message")
        finally:
            status = c.interrupt()
        if status != 0:
            raise Failed(f"the child exited {status} on Ctrl-C after the malformed message, not 0")


QUESTIONS = {
    "pipe": ("ring", "why an IC uses a VMBus channel (pipe and rings) at all"),
    "handshake": ("version", "what happens without the NEGOTIATE"),
    "epoch": ("1601", "why 100 ns units since 1601"),
    "linux": ("ptp", "how Linux uses the samples"),
}


def questions(ctx: Context) -> None:
    answers = read_answers(ctx)
    for key, (word, what) in QUESTIONS.items():
        text = answers.get(key, "")
        if not isinstance(text, str) or len(text.split()) < 15:
            raise Failed(f"answers.toml {key} ({what}): write at least a few sentences")
        if word not in text.lower():
            raise Failed(f"answers.toml {key} ({what}): your answer never mentions {word!r}")


LAB = Lab(
    number=3,
    title="Write a device: the time-sync integration service",
    difficulty="hard",
    steps=[
        Step("codec", 10, codec, "timesync.py: struct ictimesync_data is <QQQB, ictimesync_ref_data <QQBbb3x"),
        Step("guest handshake", 15, guest_handshake, "timesync.py: VscHandshake wraps a TimesyncGuest in "
             "IcVscHandshake; on_message decodes with service_version"),
        Step("host exchange", 15, host_exchange, "timesync.py: TimesyncHost.receive, handle_timer, message"),
        Step("offer to every child", 15, offers, "vsp.py serve(), vsc.py run(): read parent.log and vm1.log"),
        Step("sync offset", 15, sync, "the guest's offset is host time minus its own clock, in seconds"),
        Step("samples repeat", 10, samples, "the host sends a SAMPLE every interval once the last is answered"),
        Step("malformed message", 10, malformed, "log guest.dropped as a warning and keep reading"),
        Step("questions", 10, questions, "starter/answers.toml"),
    ],
    starter_fails=frozenset({"codec", "guest handshake", "host exchange", "offer to every child", "sync offset",
                             "samples repeat", "malformed message", "questions"}),
)
