"""CPU sizing: affinity and the cgroup quota of a container (files laid out as the kernel does)."""

import os
from pathlib import Path

import pytest

from dfm_stream.cpus import cgroup_cpu_limit, model_threads, usable_cpus


def visible() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_v1_and_v2(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_usable_cpus_is_capped_by_the_quota_and_never_zero(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path) == visible()  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1  # half a core still gets one thread
    (tmp_path / "cpu.max").write_text(f"{(visible() + 8) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == visible()  # a quota above the affinity changes nothing


def test_model_threads_only_ever_lowers_torchs_choice(tmp_path: Path) -> None:
    assert model_threads(1, tmp_path) == 1  # e.g. torch picked the physical cores: kept
    assert model_threads(visible() + 16, tmp_path) == visible()
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert model_threads(visible(), tmp_path) == 1
