"""A blocking, hand-driven VMBus client for integration tests: it can say anything, including nonsense."""

from __future__ import annotations

import socket
import time
from typing import Any

from vmbus_proto import messages as m
from vmbus_proto.auth import GuestAuth
from vmbus_proto.devices.base import Incoming
from vmbus_proto.envelope import Hello, Signal, decode_close_code, decode_packet, encode_packet
from vmbus_proto.framing import ENVELOPE_VERSION, Frame, FrameDecoder, FrameKind, encode_frame
from vmbus_proto.gpadl import split
from vmbus_proto.packets import FLAG_COMPLETION_REQUESTED, Packet


def connect(url: str, timeout: float = 15.0) -> socket.socket:
    if url.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(url[5:])
        return s
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    return s


class Closed(Exception):
    def __init__(self, reason: str | None) -> None:
        super().__init__(reason or "connection closed without a CLOSE frame")
        self.reason = reason


class RawClient:
    def __init__(self, url: str, timeout: float = 15.0) -> None:
        self.sock = connect(url, timeout)
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []
        self.close_reason: str | None = None
        self.close_code: str | None = None

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, kind: int, relid: int, body: bytes, data: bytes = b"") -> None:
        self.sock.sendall(encode_frame(kind, relid, body, data) + data)

    def hello(self, name: str, memory: int | None = None) -> Hello:
        self.send_frame(FrameKind.HELLO, 0, Hello(ENVELOPE_VERSION, name, memory=memory).encode())
        return Hello.decode(self.expect_kind(FrameKind.HELLO).body)

    def authenticate(self, name: str, secret: bytes) -> Hello:
        """HELLO with a nonce, the parent's challenge, our AUTH, the parent's AUTH (docs/protocol.md §3.1)."""
        auth = GuestAuth(name, secret)
        self.send_frame(FrameKind.HELLO, 0, auth.hello().encode())
        proof = auth.receive_hello(Hello.decode(self.expect_kind(FrameKind.HELLO).body))
        assert proof is not None
        self.send_frame(FrameKind.AUTH, 0, proof)
        auth.receive_auth(self.expect_kind(FrameKind.AUTH).body)
        assert auth.host is not None
        return auth.host

    def send(self, msg: m.Message) -> None:
        self.send_frame(FrameKind.CONTROL, 0, msg.encode())

    def send_packet(self, relid: int, pkt: Packet) -> None:
        self.send_frame(FrameKind.PACKET, relid, encode_packet(pkt), bytes(pkt.data))

    def next_frame(self, timeout: float = 15.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise Closed(self.close_reason)
            for f in self.decoder.feed(data):
                if f.kind == FrameKind.CLOSE:
                    self.close_reason, self.close_code = decode_close_code(f.body)
                else:
                    self.pending.append(f)
        return self.pending.pop(0)

    def expect_kind(self, kind: int, timeout: float = 15.0) -> Frame:
        while True:
            f = self.next_frame(timeout)
            if f.kind == kind:
                return f

    def recv_message(self, timeout: float = 15.0) -> m.Message:
        return m.decode(self.expect_kind(FrameKind.CONTROL, timeout).body)

    def expect(self, msgtype: type[m.Message], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv_message(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, msgtype):
                return msg

    def recv_packet(self, relid: int, timeout: float = 15.0) -> Packet:
        while True:
            f = self.expect_kind(FrameKind.PACKET, timeout)
            if f.relid == relid:
                return decode_packet(f.body, f.data, 1 << 20)

    def handshake(self, relid: int, hs: Any) -> None:
        """Run a device's guest-side handshake (``vmbus_proto.devices.*.VscHandshake``) on an open channel."""
        outs = hs.start()
        while not hs.done:
            for o in outs:
                self.send_packet(relid, Packet(o.type, FLAG_COMPLETION_REQUESTED, o.trans_id, o.payload))
            pkt = self.recv_packet(relid)
            outs = hs.receive(Incoming(pkt.type, pkt.trans_id, pkt.completion_requested, pkt.payload))

    def wait_closed(self, timeout: float = 15.0) -> str | None:
        """Read until the peer closes; returns the CLOSE frame's reason, if one came."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.next_frame(max(0.01, deadline - time.monotonic()))
            except Closed:
                return self.close_reason
            except (ConnectionResetError, BrokenPipeError):
                return self.close_reason

    def negotiate(self, name: str, version: int = 0x00050003, memory: int | None = None) -> dict[int, m.OfferChannel]:
        self.hello(name, memory)
        self.send(m.InitiateContact(vmbus_version_requested=version, interrupt_page=2))
        resp = self.expect(m.VersionResponse)
        assert resp.version_supported == 1
        self.send(m.RequestOffers())
        offers: dict[int, m.OfferChannel] = {}
        while True:
            msg = self.recv_message()
            if isinstance(msg, m.OfferChannel):
                offers[msg.child_relid] = msg
            elif isinstance(msg, m.AllOffersDelivered):
                return offers

    def open(self, relid: int, pages: int, gpadl: int, first_pfn: int = 0x1000) -> None:
        header, bodies = split(relid, gpadl, list(range(first_pfn, first_pfn + 2 * pages)))
        for msg in [header, *bodies]:
            self.send(msg)
        created = self.expect(m.GpadlCreated)
        assert created.creation_status == 0, created
        self.send(m.OpenChannel(child_relid=relid, openid=relid, ringbuffer_gpadlhandle=gpadl,
                                downstream_ringbuffer_pageoffset=pages))
        result = self.expect(m.OpenChannelResult)
        assert result.status == 0, result

    def signal(self, relid: int, sig: Signal) -> None:
        self.send_frame(FrameKind.SIGNAL, relid, sig.encode())

    def close(self) -> None:
        self.sock.close()
