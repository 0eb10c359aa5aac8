"""Authenticated partitions with real processes (docs/protocol.md §3.1, README "Authentication"): a parent in
"required" mode with good and bad children and a bystander; the default open mode, which takes unauthenticated
children only on local listeners (a real wildcard listener, reached over loopback, is not local); a configured
name that a newcomer cannot claim without its secret; ``replace = true`` against a silent (half-open) holder of
the name and against a real child; and the HTTP API's token on a wildcard address."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from vmbus_proto.aio.keyfile import new_secret_file, read_secret_file, read_token_file
from vmbus_proto.envelope import REPLACED

from .conftest import BIN, FAST_LIMITS, Parent, Proc, child, gave_up
from .rawclient import RawClient

pytestmark = pytest.mark.integration


def secrets(where: Path, *names: str) -> dict[str, Path]:
    where.mkdir(mode=0o700, exist_ok=True)
    return {n: new_secret_file(where / f"{n}.key") for n in names}


def auth_config(keys: dict[str, Path], **auth: Any) -> str:
    head = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}\n"
                   for k, v in auth.items())
    tables = "".join(f'[[auth.partition]]\nname = "{n}"\nsecret_file = "{p}"\n' for n, p in keys.items())
    return f"{FAST_LIMITS}\n[auth]\n{head}{tables}"


def refusals(parent: Parent, name: str) -> list[dict[str, Any]]:
    return [r for r in parent.events("partition refused") if r.get("partition") == name]


def test_required_mode_takes_good_children_and_refuses_the_rest_once(tmp_path: Path) -> None:
    keys = secrets(tmp_path / "secrets", "vm1", "bystander")
    wrong = new_secret_file(tmp_path / "secrets" / "wrong.key")
    parent = Parent(tmp_path / "parent", auth_config(keys, mode="required"))
    try:
        bystander = child(tmp_path, parent.unix, "bystander", "--secret-file", str(keys["bystander"]))
        bystander.wait_event("all offered channels open")
        good = child(tmp_path, parent.tcp, "vm1", "--secret-file", str(keys["vm1"]))
        good.wait_event("parent authenticated")
        good.wait_event("all offered channels open")
        parent.wait_event("partition connected", partition="vm1", authenticated=True)

        # A wrong secret: refused once, one line, exit 3, no retry (reconnecting is on by default).
        bad = child(tmp_path, parent.tcp, "vm1", "--secret-file", str(wrong))
        line = gave_up(bad)
        assert line == (f"child-partition: error: the parent at {parent.tcp} refused this child: authentication "
                        f"failed for partition 'vm1'; check --secret-file: it must hold the same secret as the "
                        f"parent's [[auth.partition]] secret_file for this name"), line
        parent.wait_for(lambda r: r.get("event") == "partition refused" and r.get("partition") == "vm1")
        assert [(r["code"], r["detail"]) for r in refusals(parent, "vm1")] == [("auth-failed", "wrong proof")]

        # No secret at all, on the Unix socket: "required" refuses it everywhere.
        anon = child(tmp_path, parent.unix, "vm3")
        assert "authentication required: this parent accepts only authenticated partitions" in gave_up(anon)
        # A name with no secret configured, with some secret: refused as a wrong secret is.
        stranger = child(tmp_path, parent.unix, "vm4", "--secret-file", str(keys["vm1"]))
        assert "authentication failed for partition 'vm4'" in gave_up(stranger)
        parent.wait_for(lambda r: r.get("event") == "partition refused" and r.get("partition") == "vm4")
        assert refusals(parent, "vm4")[0]["detail"] == "no secret is configured for this name"
        # The right secret while vm1 is connected: without [auth] replace, the name is taken.
        twin = child(tmp_path, parent.unix, "vm1", "--secret-file", str(keys["vm1"]))
        assert "partition name 'vm1' is already connected" in gave_up(twin)

        for vm in (good, bystander):
            assert not vm.events("session with the parent ended"), f"{vm.name} noticed the refused children"
            assert vm.stop() == 0
    finally:
        parent.stop()


def test_open_mode_takes_unauthenticated_children_only_on_local_listeners(tmp_path: Path) -> None:
    """The wildcard listener is reached over loopback here, but it is bound where other hosts can reach it: the
    parent decides by the listener, so an unauthenticated child is refused on it and taken on the Unix socket."""
    keys = secrets(tmp_path / "secrets", "vm1")
    parent = Parent(tmp_path / "parent", FAST_LIMITS,  # the secret from the command line, as in a container
                    extra=["--listen", "tcp://0.0.0.0:0", "--partition-secret", f"vm1={keys['vm1']}"])
    try:
        listening = parent.events("parent partition listening")[0]["listen"]
        wildcard = next(u for u in listening if u.startswith("tcp://0.0.0.0:"))
        via_loopback = wildcard.replace("0.0.0.0", "127.0.0.1")
        warning = parent.wait_event("partitions with no secret configured may connect unauthenticated on local "
                                    "listeners ([auth] mode = \"open-on-loopback\")")
        assert "tcp://0.0.0.0:0" not in warning["listeners"] and len(warning["listeners"]) == 2, warning

        anon = child(tmp_path, via_loopback, "anon")
        assert ("refused this child: authentication required: this parent accepts only authenticated partitions "
                "(hmac-sha256) on this address") in gave_up(anon)
        local = child(tmp_path, parent.unix, "anon")
        local.wait_event("all offered channels open")
        parent.wait_event("partition connected", partition="anon", authenticated=False)
        vm1 = child(tmp_path, via_loopback, "vm1", "--secret-file", str(keys["vm1"]))
        vm1.wait_event("all offered channels open")
        parent.wait_event("partition connected", partition="vm1", authenticated=True)
        assert vm1.stop() == 0 and local.stop() == 0

        # vm1 has left. A newcomer that claims its name without its secret does not get its disk, even here.
        parent.wait_event("partition disconnected", partition="vm1")
        impostor = child(tmp_path, parent.unix, "vm1")
        assert "authentication required: partition 'vm1' has a secret on this parent" in gave_up(impostor)
    finally:
        parent.stop()


def test_replace_takes_the_name_from_a_silent_holder_and_from_a_running_child(tmp_path: Path) -> None:
    keys = secrets(tmp_path / "secrets", "vm1")
    secret = read_secret_file(keys["vm1"])
    parent = Parent(tmp_path / "parent", auth_config(keys, mode="required", replace=True))
    try:
        # A connection that authenticated and then went silent: what a half-open TCP connection looks like to the
        # parent until keepalive gives up on it.
        silent = RawClient(parent.tcp)
        assert silent.authenticate("vm1", secret).partition == "parent"
        parent.wait_event("partition connected", partition="vm1")
        first = child(tmp_path, parent.unix, "vm1", "--secret-file", str(keys["vm1"]))
        first.wait_event("all offered channels open")
        assert silent.wait_closed(30) is not None and silent.close_code == REPLACED, silent.close_reason
        parent.wait_event("partition replaced by a new authenticated connection")
        silent.close()

        # A running child replaced by another one: the first gives up with one line instead of taking it back.
        mark = parent.mark()
        second = child(tmp_path, parent.tcp, "vm1", "--secret-file", str(keys["vm1"]))
        second.wait_event("all offered channels open")
        line = gave_up(first)
        assert "was replaced by a new authenticated connection" in line and "stop one of them" in line, line
        parent.wait_event("partition connected", start=mark, partition="vm1", authenticated=True)
        assert not second.events("session with the parent ended")
        assert second.stop() == 0
    finally:
        parent.stop()


async def _http(method: str, url: str, **kw: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.request(method, url, allow_redirects=False,
                                                                   **kw) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def _websocket(url: str, cookie: str | None) -> int:
    """The websocket handshake's status (101 when the socket opened)."""
    headers = {"Cookie": cookie} if cookie else {}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers) as ws:
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def test_the_api_off_loopback_needs_its_token(tmp_path: Path) -> None:
    token_file = new_secret_file(tmp_path / "http.token")
    token = read_token_file(token_file)
    # Without a token the parent does not serve its API where other hosts can reach it.
    lone = Proc([str(BIN / "parent-partition"), "serve", "--json-logs", "--listen", f"unix:{tmp_path}/x.sock",
                 "--data-dir", str(tmp_path / "v0"), "--http", "0.0.0.0:0"], tmp_path, "parent-without-token")
    assert lone.proc.wait(60) == 1
    lone.stop()
    assert "would be reachable from other hosts with no authentication: set [http] token_file" in lone.raw[-1]

    parent = Parent(tmp_path / "parent", FAST_LIMITS,
                    extra=["--http", "0.0.0.0:0", "--http-token-file", str(token_file)])
    try:
        url = parent.wait_event("web console and API listening")["url"]
        api = url.replace("0.0.0.0", "127.0.0.1")
        vm = child(tmp_path, parent.unix, "vm1")
        vm.wait_event("all offered channels open")

        status, headers, body = asyncio.run(_http("GET", f"{api}/api/partitions"))
        assert status == 401 and headers.get("WWW-Authenticate") == 'Bearer realm="vmbus-emu"', (status, body)
        bearer = {"Authorization": f"Bearer {token}"}
        assert asyncio.run(_http("GET", f"{api}/api/partitions", headers=bearer))[0] == 200
        wrong = {"Authorization": f"Bearer {'0' * 64}"}
        assert asyncio.run(_http("GET", f"{api}/api/partitions", headers=wrong))[0] == 401
        for method, path in (("DELETE", "/api/partitions/vm1/devices/keyboard"),
                             ("POST", "/api/partitions/vm1/input/text")):
            assert asyncio.run(_http(method, api + path, json={"text": "x"}))[0] == 401, f"{method} {path}"

        # A browser: ?token= once, then an HttpOnly SameSite=Strict cookie for the pages and websockets.
        status, headers, _ = asyncio.run(_http("GET", f"{api}/partitions/vm1?token={token}"))
        assert status == 302 and headers["Location"] == "/partitions/vm1", (status, headers)
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie, cookie
        pair = cookie.split(";", 1)[0]
        assert asyncio.run(_http("GET", f"{api}/partitions/vm1", headers={"Cookie": pair}))[0] == 200
        assert asyncio.run(_http("GET", f"{api}/partitions/vm1?token=nottheone"))[0] == 401
        forged = {"Cookie": f"vmbus_token={'0' * 64}"}
        assert asyncio.run(_http("GET", f"{api}/partitions/vm1", headers=forged))[0] == 401
        ws = api.replace("http://", "ws://") + "/ws/partitions"
        assert asyncio.run(_websocket(ws, pair)) == 101
        assert asyncio.run(_websocket(ws, None)) == 401

        keys = [str(BIN / "parent-partition"), "send-keys", "--api", api, "vm1", "ls\n"]
        without = subprocess.run(keys, check=False, capture_output=True, text=True, timeout=60)
        assert without.returncode == 1 and "needs its token" in without.stderr, without.stderr
        sent = subprocess.run([*keys[:2], "--token-file", str(token_file), *keys[2:]], check=False,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and "key events sent" in sent.stdout, sent.stderr
        assert vm.stop() == 0
    finally:
        parent.stop()


def test_the_load_tool_proves_a_secret_shared_by_a_name_prefix(tmp_path: Path) -> None:
    """Load partitions are named PREFIX-WORKLOAD-PID-INDEX: the parent holds one secret for "PREFIX-*"."""
    (tmp_path / "secrets").mkdir(mode=0o700)
    shared = new_secret_file(tmp_path / "secrets" / "hostA.key")
    parent = Parent(tmp_path / "parent", auth_config({"hostA-*": shared}, mode="required"))
    try:
        load = [str(BIN / "child-partition"), "load", "churn", "--connect", parent.unix, "--partitions", "1",
                "--warmup", "0", "--runtime", "1", "--processes", "2", "--quiet", "--name-prefix"]
        done = subprocess.run([*load, "hostA", "--secret-file", str(shared)], check=False, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        taken = [r["partition"] for r in parent.events("partition connected") if r.get("authenticated")]
        assert taken and all(n.startswith("hostA-churn-") for n in taken), taken
        other = subprocess.run([*load, "hostB", "--secret-file", str(shared)], check=False, capture_output=True,
                               text=True, timeout=120)
        said = other.stdout + other.stderr
        assert other.returncode != 0 and "authentication failed for partition 'hostB-churn-" in said, said
    finally:
        parent.stop()
