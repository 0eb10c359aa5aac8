"""Run ``child-partition`` with your ``split()`` in place of the project's (the grader's "real parent" step).

    python labs/02-gpadls-and-rings/patched_child.py labs/02-gpadls-and-rings/starter run --connect URL ...

The child's control plane (vmbus_proto/client.py ``create_gpadl``) calls ``split(relid, gpadl, pfns)`` for
every GPADL it shares: each channel's ring pages, netvsc's receive and send buffers, the video VRAM. This
script loads ``gpadl.py`` from the folder it is given, puts its ``split`` there instead, prints one line per
call, and hands the rest of the command line to the child. The parent answers each GPADL with
GPADL_CREATED; ``--trace`` shows them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import vmbus_proto.client
from child_partition.cli import main


def _load(folder: Path) -> Any:
    spec = importlib.util.spec_from_file_location("lab2_student_gpadl", folder / "gpadl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def patch(folder: Path) -> None:
    student = _load(folder)

    def split(relid: int, gpadl: int, pfns: list[int]) -> Any:
        header, bodies = student.split(relid, gpadl, pfns)
        print(f"lab2 split: relid={relid} gpadl={gpadl:#x} pfns={len(pfns)} -> header + {len(bodies)} bodies",
              flush=True)
        return header, bodies

    vmbus_proto.client.split = split  # type: ignore[attr-defined]


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    patch(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
