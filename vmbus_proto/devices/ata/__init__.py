"""The emulated ATA (IDE) disk: register model (``registers``) and the sans-IO controller (``controller``)."""
