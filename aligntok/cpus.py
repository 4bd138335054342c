"""How many CPUs this process may use."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs of this process's affinity (a Slurm step, taskset, a container's cpuset), not all of the node's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1
