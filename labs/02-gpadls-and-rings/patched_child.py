"""Run ``child-partition`` with your ``split()`` in place of the project's (the grader's "real parent" step).

    python labs/02-gpadls-and-rings/patched_child.py labs/02-gpadls-and-rings/starter run --connect URL ...
    python labs/02-gpadls-and-rings/patched_child.py labs/02-gpadls-and-rings/starter check --connect URL

``check`` runs such a child with ``--trace`` until every GPADL it shared was answered, prints the GPADL lines,
stops it and exits 0 if the parent accepted them all (what the grader's "real parent" step does).

The child's control plane (vmbus_proto/client.py ``create_gpadl``) calls ``split(relid, gpadl, pfns)`` for
every GPADL it shares: each channel's ring pages, netvsc's receive and send buffers, the video VRAM. This
script loads ``gpadl.py`` from the folder it is given, puts its ``split`` there instead, prints one line per
call, and hands the rest of the command line to the child. The parent answers each GPADL with
GPADL_CREATED; ``--trace`` shows them.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for labs.harness
import vmbus_proto.client
from child_partition.cli import main
from labs.harness import Failed, Proc, import_file

SPLIT_LINE = re.compile(r"lab2 split: relid=\d+ gpadl=(0x[0-9a-f]+)")
CREATED = re.compile(r"GPADL_CREATED\(10\) child_relid=\d+ gpadl=(0x[0-9a-f]+) creation_status=(0x[0-9a-f]+)")


def _load(folder: Path) -> Any:
    return import_file(folder / "gpadl.py", f"lab2_student_gpadl_{folder.name}")


def patch(folder: Path) -> None:
    student = _load(folder)

    def split(relid: int, gpadl: int, pfns: list[int]) -> Any:
        header, bodies = student.split(relid, gpadl, pfns)
        print(f"lab2 split: relid={relid} gpadl={gpadl:#x} pfns={len(pfns)} -> header + {len(bodies)} bodies",
              flush=True)
        return header, bodies

    vmbus_proto.client.split = split  # type: ignore[attr-defined]


def check(folder: Path, url: str, log: Path, timeout: float = 90.0) -> list[str]:
    """Run a child with ``folder``'s split until every GPADL it shared was answered; the GPADL ids. Failed
    says what went wrong (a refused GPADL, a child that exited or hung)."""
    child = Proc([sys.executable, __file__, str(folder), "run", "--connect", url, "--name", "lab2",
                  "--trace"], log)
    try:
        deadline = time.monotonic() + timeout
        while True:  # until every device's channel opened (or failed) and every GPADL was answered
            out = child.output()
            asked = SPLIT_LINE.findall(out)
            answered = dict(CREATED.findall(out))
            failed = {g: s for g, s in answered.items() if s != "0x0"}
            if failed:
                raise Failed(f"the parent refused GPADLs {failed} (GPADL_CREATED with a failure status): "
                             "read the GPADL_HEADER/BODY lines of a child run with --trace")
            settled = "all offered channels open" in out or "offered channels open except" in out
            if settled and asked and all(g in answered for g in asked):
                return asked
            if child.popen.poll() is not None or time.monotonic() > deadline:
                missing = [g for g in asked if g not in answered]
                raise Failed(f"the child {'exited' if child.popen.poll() is not None else 'is stuck'}: "
                             f"GPADLs {missing} have no GPADL_CREATED; its last lines:\n"
                             + "\n".join(out.splitlines()[-8:]))
            time.sleep(0.05)
    finally:
        child.interrupt()


def _check_command(folder: Path, argv: list[str]) -> int:
    url = argv[argv.index("--connect") + 1] if "--connect" in argv else "tcp://127.0.0.1:6464"
    log = Path("lab2-child.log")
    try:
        asked = check(folder, url, log)
    except Failed as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    finally:
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if "GPADL" in line or "lab2 split" in line:
                print(line)
    print(f"OK: the parent accepted all {len(asked)} GPADLs your split() made (the child's log: {log})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    if sys.argv[2] == "check":
        sys.exit(_check_command(Path(sys.argv[1]), sys.argv[3:]))
    patch(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
