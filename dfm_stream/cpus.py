"""How many CPU cores this process may use: its CPU affinity and, in a container, the CPU quota.

torch (and ONNX Runtime / OpenVINO, which take torch's thread count here) size their thread pools
by the cores they *see*; in a Kubernetes pod limited to 4 CPUs on a 64-core node that is 64
threads sharing 4 cores' worth of time, and the kernel throttles the whole process every 100 ms.
The worker therefore caps its pools at :func:`usable_cpus` unless told otherwise (``--threads``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """Return the CPU quota of this process's cgroup in cores (None: no limit, or no cgroup)."""
    v2 = root / "cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"
    if v2.is_file():
        parts = v2.read_text().split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    quota, period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"  # cgroup v1
    if quota.is_file() and period.is_file():
        return _ratio(quota.read_text().strip(), period.read_text().strip())
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # v1 writes -1 for "no limit"


def model_threads(default: int, root: Path = CGROUP_ROOT) -> int:
    """Return ``default`` (torch's own choice) capped by :func:`usable_cpus`: never more threads."""
    return max(1, min(default, usable_cpus(root)))


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """Return the cores this process may run on: its affinity, capped by the cgroup quota (>= 1)."""
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        visible = min(visible, math.ceil(limit))
    return max(1, visible)


CPU_FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)
"""The ``/proc/cpuinfo`` flags that decide what reduced precision can gain (VNNI: int8 dot products)."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Return the CPU feature flags of the first processor in ``cpuinfo`` (empty where unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Return True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def has_int8_dot(flags: frozenset[str] | None = None) -> bool:
    """Return True when the CPU has int8 dot-product instructions (VNNI, AVX-VNNI or AMX-INT8)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
