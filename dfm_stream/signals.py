"""SIGTERM/SIGINT -> a stop event, the graceful-shutdown contract of every long-running command.

Kubernetes and ``docker stop`` send SIGTERM before they kill; Ctrl-C sends SIGINT. Both only set
a :class:`threading.Event` that the command's loops watch, so the command finishes what it holds
(a batch in flight, a camera release) and exits 0.
"""

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, action: str) -> Iterator[threading.Event]:
    """Make SIGTERM/SIGINT set ``stop`` while the block runs; restore the previous handlers after.

    ``action`` says what the process does next, for the log line (e.g. "releasing cameras").
    """

    def on_signal(signum: int, _frame: object) -> None:
        # A repeated signal must not call Event.set() again: the handler may interrupt the main
        # thread while it holds the Event's lock, and a second set() would deadlock on it.
        if stop.is_set():
            return
        log.info("received %s: %s", signal.Signals(signum).name, action)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
