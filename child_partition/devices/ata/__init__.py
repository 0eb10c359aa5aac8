"""The guest's side of the emulated ATA disk: port I/O by trapping (``portio``) and a PIO driver (``driver``)."""
