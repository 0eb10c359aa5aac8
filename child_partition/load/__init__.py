"""``child-partition load``: load generators for every device class, and the engine that runs them.

``WORKLOADS`` names each workload's class as "module:Class", imported only when the load tool runs (a workload
whose module is missing is left out of the command with a note in its help)."""

WORKLOADS: dict[str, str] = {
    "storage": "child_partition.load.storage:StorageWorkload",
    "network": "child_partition.load.network:NetworkWorkload",
    "video": "child_partition.load.video:VideoWorkload",
    "input": "child_partition.load.input:InputWorkload",
    "churn": "child_partition.load.churn:ChurnWorkload",
}
