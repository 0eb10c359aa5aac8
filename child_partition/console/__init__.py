"""The guest console: a text console on the synthetic video framebuffer, typed into with the synthetic keyboard.

A guest program, not a device: it uses the video, input, storage and network services as a shell on Linux's
framebuffer console uses /dev/fb0, the input layer, the disks and the network stack."""
