"""``child-partition load``: load generators for every device class, and the engine that runs them."""
