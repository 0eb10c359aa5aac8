"""The emulated ATA disk: an IDE controller on trapped I/O ports, on the same disks StorVSP serves."""
