"""What the benchmark records to tell machines apart, and two short calibrations.

Two machines "of the same kind" (2 vCPUs, same image) gave 3x different CPU per I/O for the same code, so
every result carries: the CPU as the guest sees it (/proc/cpuinfo: model, family/model/stepping, microcode,
MHz and flags of note), the kernel (``uname -r``) and its mitigations (/sys/devices/system/cpu/vulnerabilities
and the mitigation switches on the kernel command line), the clocksource, the Python build (PGO/LTO), the
filesystem of the benchmark's working directory, memory, load and CPU pressure at the start, and:

* a pure-Python calibration: a fixed interpreter workload (dict, arithmetic, a call, a bytes slice), in
  loops per second. The parent and the guest are Python, so this predicts their CPU per operation;
* a syscall calibration: ``os.getppid()`` (the cheapest real syscall) and ``os.read`` of one byte from
  /dev/zero, in ns per call, minus a zero-argument builtin that makes no syscall (the Python-side cost of
  the call). Mitigations (retpolines, IBPB/SRSO, PTI) show up here;
* a wake-up calibration: a one-byte ping-pong between two processes over a socketpair, in µs per round
  trip. Every VMBus round trip costs at least one such wake-up when the processes are not batching;
* copy calibrations: copying 1 MiB in user space (between two existing buffers, GB/s), and 64 KiB through a Unix
  socketpair in this process (a ``send`` and a ``recv_into``: two kernel copies, no wake-up), in µs. The
  64 KiB echo cells cost the parent about twice as much on one machine as on another with the same code,
  while the 1 KiB cells did not move: these say whether the machine copies more slowly.

Best of several short tries (the minimum is the least disturbed by other load); the whole takes about
half a second. The benchmark calibrates at its start and again at its end: on these shared machines the
same figure moves by up to 2x within minutes under load, and a start/end pair shows whether it did.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

VULNERABILITIES = Path("/sys/devices/system/cpu/vulnerabilities")
CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
# Flags whose presence changes what the kernel and the interpreter cost: virtualisation, TSC quality,
# speculation controls, copy instructions, vector width.
FLAGS_OF_NOTE = ("hypervisor", "constant_tsc", "nonstop_tsc", "tsc_known_freq", "pti", "ibrs", "ibpb", "stibp",
                 "ssbd", "md_clear", "pcid", "invpcid", "erms", "fsrm", "avx2", "avx512f", "sha_ni")
CMDLINE_SWITCHES = re.compile(r"^(mitigations|nospectre_\w+|spectre_\w+|retbleed|spec_rstack_overflow|pti|nopti|"
                              r"mds|tsx_async_abort|l1tf|spec_store_bypass_disable|srbds|gather_data_sampling)(=|$)")


def _read(path: Path | str, default: str = "") -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return default


def cpu_info() -> dict[str, Any]:
    """The first processor's entry of /proc/cpuinfo, cut to what tells CPUs apart."""
    first: dict[str, str] = {}
    for line in _read("/proc/cpuinfo").splitlines():
        if not line.strip():
            if first:
                break
            continue
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    flags = set(first.get("flags", "").split())
    out: dict[str, Any] = {k.replace(" ", "_"): first[k] for k in ("model name", "vendor_id", "cpu family", "model",
                                                                   "stepping", "microcode", "cpu MHz", "bogomips",
                                                                   "cache size") if k in first}
    out["flags_of_note"] = sorted(f for f in FLAGS_OF_NOTE if f in flags)
    out["cpus"] = os.cpu_count()
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        out["governor"] = governor
        out["cur_freq_khz"] = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    return out


def mitigations() -> dict[str, str]:
    """Each vulnerability file's text, only those not "Not affected" (the rest tell nothing apart)."""
    out: dict[str, str] = {}
    try:
        entries = sorted(VULNERABILITIES.iterdir())
    except OSError:
        return out
    for entry in entries:
        text = _read(entry)
        if text and text != "Not affected":
            out[entry.name] = text
    return out


def fs_type(path: Path) -> dict[str, str]:
    """The mount holding ``path`` (the longest matching mount point in /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    best: dict[str, str] = {"fstype": "unknown", "mount_point": "", "source": "", "options": ""}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best["mount_point"]):
            best = {"fstype": tail[0], "mount_point": mount_point, "source": tail[1], "options": fields[5]}
    return best


def python_build() -> dict[str, Any]:
    config = str(sysconfig.get_config_var("CONFIG_ARGS") or "")  # a distribution build may not show its PGO/LTO here
    return {"version": sys.version.split()[0], "implementation": platform.python_implementation(),
            "compiler": platform.python_compiler(), "pgo": "--enable-optimizations" in config,
            "lto": "--with-lto" in config, "executable": sys.executable}


def _best_ns(func: Callable[[int], None], n: int, tries: int = 9) -> float:
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter_ns()
        func(n)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def _python_work(n: int) -> None:
    """The fixed interpreter workload: a dict store and load, arithmetic, a call and a slice per loop."""
    table: dict[int, int] = {}
    data = bytes(range(256))
    total = 0
    for i in range(n):
        key = i & 255
        table[key] = i
        total += table[key] * 3 // 7 + len(data[key:key + 8])
    if total < 0:
        raise AssertionError("unreachable")


def _loop(call: Callable[[], object]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            call()
    return run


def _ping_pong_us(rounds: int = 5000, tries: int = 3) -> float:
    """µs per one-byte round trip between this process and a forked child over a socketpair."""
    best = float("inf")
    for _ in range(tries):
        a, b = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: echo until the parent closes its end
            a.close()
            try:
                while b.recv(1):
                    b.send(b"x")
            finally:
                os._exit(0)
        b.close()
        try:
            t0 = time.perf_counter_ns()
            for _ in range(rounds):
                a.send(b"x")
                a.recv(1)
            best = min(best, (time.perf_counter_ns() - t0) / rounds / 1000)
        finally:
            a.close()
            os.waitpid(pid, 0)
    return best


def _copy_gb_per_s(size: int = 1 << 20) -> float:
    """memmove of ``size`` bytes between two existing buffers (no allocation, so no page faults)."""
    src, dst = bytearray(size), bytearray(size)

    def run(n: int) -> None:
        for _ in range(n):
            dst[:] = src

    return size / _best_ns(run, 50)


def _socket_64k_us(size: int = 64 * 1024) -> float:
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * size)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * size)
        data, buf = bytes(size), bytearray(size)
        view = memoryview(buf)

        def run(n: int) -> None:
            for _ in range(n):
                a.sendall(data)
                got = 0
                while got < size:
                    got += b.recv_into(view[got:])

        return _best_ns(run, 200) / 1000
    finally:
        a.close()
        b.close()


def calibrate() -> dict[str, float]:
    """Python loops per second, syscall ns, process wake-up µs, copy speed (best of a few short tries each)."""
    py_ns = _best_ns(_python_work, 50_000)
    builtin_ns = _best_ns(_loop(sys.getrecursionlimit), 50_000)
    getppid_ns = _best_ns(_loop(os.getppid), 50_000)
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        read_ns = _best_ns(_loop(lambda: os.read(fd, 1)), 30_000)
    finally:
        os.close(fd)
    lambda_ns = _best_ns(_loop(lambda: divmod(fd, 1)), 30_000)  # the same shape, no syscall
    return {"python_loops_per_s": round(1e9 / py_ns),
            "python_builtin_call_ns": round(builtin_ns, 1),
            "syscall_getppid_ns": round(getppid_ns - builtin_ns, 1),
            "syscall_read_devzero_ns": round(read_ns - lambda_ns, 1),
            "process_wakeup_roundtrip_us": round(_ping_pong_us(), 2),
            "copy_1mib_gb_per_s": round(_copy_gb_per_s(), 2),
            "socket_64k_send_recv_us": round(_socket_64k_us(), 2)}


def describe(workdir: Path) -> dict[str, Any]:
    """Everything above, for a result file's ``meta.machine``."""
    mem = psutil.virtual_memory()
    return {
        "cpu": cpu_info(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "mitigations": mitigations(),
        "cmdline_mitigation_switches": [t for t in _read("/proc/cmdline").split() if CMDLINE_SWITCHES.match(t)],
        "clocksource": _read(CLOCKSOURCE, "unknown"),
        "workdir_fs": fs_type(workdir),
        "python": python_build(),
        "memory_bytes": mem.total,
        "memory_available_bytes": mem.available,
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "cpu_pressure_some_avg10": _psi_some_avg10(),
        "calibration": calibrate(),
    }


def _psi_some_avg10() -> float | None:
    """/proc/pressure/cpu "some avg10": % of the last 10 s in which some task waited for a CPU."""
    m = re.search(r"some avg10=([\d.]+)", _read("/proc/pressure/cpu"))
    return float(m.group(1)) if m else None


def calibration_line(cal: dict[str, float]) -> str:
    return (f"{cal['python_loops_per_s']:,} Python loops/s, getppid {cal['syscall_getppid_ns']:.0f} ns, "
            f"read(/dev/zero) {cal['syscall_read_devzero_ns']:.0f} ns, process wake-up round trip "
            f"{cal['process_wakeup_roundtrip_us']:.1f} µs, 1 MiB copy {cal['copy_1mib_gb_per_s']:.1f} GB/s, 64 KiB "
            f"through a socketpair {cal['socket_64k_send_recv_us']:.1f} µs")


def summary_lines(m: dict[str, Any], loadavg: list[float]) -> list[str]:
    """The machine in a few printed lines (the same facts are in the JSON)."""
    cpu, cal, fs = m["cpu"], m["calibration"], m["workdir_fs"]
    ident = f"family {cpu.get('cpu_family', '?')} model {cpu.get('model', '?')} stepping {cpu.get('stepping', '?')}"
    mit = "; ".join(f"{k}: {v}" for k, v in m["mitigations"].items()) or "none reported"
    py = m["python"]
    return [
        f"CPU: {cpu.get('model_name', '?')} ({ident}, microcode {cpu.get('microcode', '?')}, "
        f"{cpu.get('cpu_MHz', '?')} MHz), {cpu['cpus']} CPUs; flags: {' '.join(cpu['flags_of_note'])}",
        f"kernel {m['kernel']}, clocksource {m['clocksource']}; mitigations: {mit}"
        + (f"; cmdline: {' '.join(m['cmdline_mitigation_switches'])}" if m["cmdline_mitigation_switches"] else ""),
        f"Python {py['version']} (PGO {py['pgo']}, LTO {py['lto']}); work dir on {fs['fstype']} ({fs['mount_point']}); "
        f"memory available {m['memory_available_bytes'] / 2**30:.1f} GiB",
        f"calibration: {calibration_line(cal)}",
        f"load average at start {loadavg[0]:.2f} {loadavg[1]:.2f} {loadavg[2]:.2f}; CPU pressure (some, 10 s) "
        f"{m['cpu_pressure_some_avg10']}%",
    ]
