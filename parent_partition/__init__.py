"""The parent partition: a VMBus host daemon with the storage, network, video and HID VSPs."""
