"""Session fixtures that fit models, registered once for the whole run through ``conftest.pytest_plugins``.

A fixture defined here (not imported into test modules) is built once per session: importing a
fixture function into a test module by name would give that module its own copy, and fit again.
Model code (torch) is imported when a fixture runs, so tests that need no model do not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from worker_helpers import Artifact


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """The tiny fitted resnet18 artifact on disk, with good and defect frames it separates."""
    from worker_helpers import fit_artifact

    return fit_artifact(tmp_path_factory.mktemp("artifact"))
