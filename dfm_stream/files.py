"""Writing result files atomically, with the permissions any other new file would get.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and ``os.replace`` keeps
that mode: an artifact fitted on the host would then be unreadable for the non-root user of the
container it is mounted into. Here the temporary file is created with ``os.open(..., 0o666)``, so
the kernel applies the process umask exactly as for ``open(path, "w")`` (0644 with umask 022).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

NEW_FILE_MODE = 0o666
"""The mode asked for; the umask takes its bits away (as ``open()`` and ``touch`` do)."""


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see either the old file or the complete new one. The parent folder is created. The
    new file's mode is ``0o666`` minus the umask; OSError propagates (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
