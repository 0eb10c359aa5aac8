"""vmbus_proto: the sans-IO VMBus protocol shared by the parent (host) and child (guest) partitions.

Mirrors the Hyper-V VMBus control plane (Linux include/linux/hyperv.h, OpenVMM vmbus_core/protocol.rs)
and its ring-buffer packet layer (Linux drivers/hv/ring_buffer.c, OpenVMM vmbus_ring). Nothing in this
package except ``vmbus_proto.aio`` does I/O, reads a clock or imports asyncio.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
