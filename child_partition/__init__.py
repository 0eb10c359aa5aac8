"""The child partition: a guest VM's VMBus client, its VSC drivers and a small guest on top."""
