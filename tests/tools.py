"""Finding the system tools some tests need (ffmpeg, promtool, prometheus)."""

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Return the path of ``name``; skip the test when it is missing, but fail under CI (CI=true)."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (scripts/test.sh installs it with apt-get when run as root)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")
