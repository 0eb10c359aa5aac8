"""A diagnostic echo device (ours, not Hyper-V's): every request is completed with its own payload, and
a GPA-direct request's data is sent back into its ranges, the way a storage READ returns data. Only the
benchmark registers it."""

from __future__ import annotations

import uuid

from ..base import DeviceSpec

SPEC = DeviceSpec(name="echo", class_id=uuid.UUID("8c4e1d6a-3b1f-5e0a-9a57-7e6d2f0b1e01"),
                  default_instance=uuid.UUID("8c4e1d6a-3b1f-5e0a-9a57-7e6d2f0b1e02"), pipe_mode=False,
                  mmio_megabytes=0, ring_bytes=(256 + 4) * 1024, max_packet=64 * 1024)
