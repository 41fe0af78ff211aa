"""What a benchmark result must carry besides its numbers: the machine, the versions, the statistics.

Figures of one machine are only comparable with figures of the same machine, measured in the same
run; these helpers record enough to tell (CPU model, cores, RAM, GPU, load average, library and
server versions) and summarise repeated measurements as a median with their spread.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from dfm_stream.cpus import CPU_FLAGS_OF_INTEREST, cgroup_cpu_limit, cpu_flags, usable_cpus

_PACKAGES = (
    "dfm-stream",
    "torch",
    "torchvision",
    "numpy",
    "opencv-python-headless",
    "redis",
    "msgpack",
    "onnxruntime",
    "onnx",
    "openvino",
)


def summarize(values: list[float]) -> dict[str, Any]:
    """Return ``median``, ``min``, ``max``, ``q1``/``q3`` (inclusive quartiles) and every run."""
    runs = [float(v) for v in values]
    if not runs:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None, "runs": []}
    q1, q3 = runs[0], runs[0]
    if len(runs) > 1:
        quartiles = statistics.quantiles(runs, n=4, method="inclusive")
        q1, q3 = quartiles[0], quartiles[2]
    return {
        "n": len(runs),
        "median": statistics.median(runs),
        "min": min(runs),
        "max": max(runs),
        "q1": q1,
        "q3": q3,
        "runs": runs,
    }


def percentile(values: list[float], q: float) -> float | None:
    """Return the ``q``-th percentile (0-100, linear interpolation) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    """Return the 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Describe this machine: CPU model, logical cores, RAM, GPU(s), OS, torch threads."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_bytes": int(props.total_memory)})
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cpus(),
        "cgroup_cpu_limit": cgroup_cpu_limit(),
        "ram_bytes": _mem_total_bytes(),
        "gpus": gpus,
        "os": f"{platform.system()} {platform.release()}",
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "cpu_flags": sorted(set(CPU_FLAGS_OF_INTEREST) & cpu_flags()),
    }


def versions(redis_server: str | None = None) -> dict[str, str | None]:
    """Return the Python version and the installed versions of the packages that matter here."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["redis-server"] = redis_server
    return out


def read_proc_status_kib(field: str) -> int | None:
    """Return a ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class LoadSampler:
    """Samples the 1-minute load average in a daemon thread: a busy machine makes figures noisy."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            load = load_average()
            if load:
                self.samples.append(load[0])
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict[str, float | None]:
        """Return the highest and the mean 1-minute load average seen."""
        if not self.samples:
            return {"max": None, "mean": None}
        return {"max": max(self.samples), "mean": sum(self.samples) / len(self.samples)}


def _busy_cpu_seconds() -> float | None:
    """Return the CPU seconds all cores spent busy since boot (``/proc/stat``); None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def pid_cpu_seconds(pid: int) -> float:
    """Return the CPU seconds (user + system) process ``pid`` used so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class CpuWindow:
    """How much CPU *other* processes used while a stage ran, in cores (0.0 = the machine was ours).

    Busy time of every core (``/proc/stat``) minus this process's time, its waited-for children's
    (workers, the fit process) and the time of ``extra_pids`` that are still running (the embedded
    redis-server). Figures measured while other processes used a core are not comparable.
    """

    def __init__(self, extra_pids: list[int] | None = None) -> None:
        self.extra_pids = list(extra_pids or [])
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, float | None, float]:
        t = os.times()
        mine = t.user + t.system + t.children_user + t.children_system
        mine += sum(pid_cpu_seconds(pid) for pid in self.extra_pids)
        return time.monotonic(), _busy_cpu_seconds(), mine

    def foreign_cores(self) -> float | None:
        """Return the mean number of cores other processes kept busy since this window opened."""
        wall0, busy0, mine0 = self._start
        wall1, busy1, mine1 = self._snapshot()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return None
        return max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / (wall1 - wall0))
