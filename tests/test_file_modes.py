"""Artifacts and pulled models get the usual permissions (0666 minus the umask), not mkstemp's 0600.

A model fitted on the host is mounted into the container, whose user is not root and not the
host user: with 0600 it could not read it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from model_helpers import fitted_tiny_model

from dfm_stream.artifact import ArtifactInfo, save_artifact, update_calibration
from dfm_stream.files import write_atomic


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saved_and_recalibrated_artifacts_are_world_readable(tmp_path: Path, umask_022: None) -> None:
    model = fitted_tiny_model()
    path = tmp_path / "models" / "m.dfm"
    save_artifact(path, model, ArtifactInfo.for_model(model, (64, 64), n_train=24))
    assert _mode(path) == 0o644
    path.chmod(0o600)  # calibrate rewrites the file: it gets the umask's mode again
    update_calibration(path, 1.0, 0.5, 2.0)
    assert _mode(path) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["m.dfm"], "no temporary file is left behind"


def test_write_atomic_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.bin") == 0o600
    write_atomic(tmp_path / "again.bin", b"y")
    assert _mode(tmp_path / "again.bin") == 0o666 & ~old
    assert (tmp_path / "again.bin").read_bytes() == b"y"
