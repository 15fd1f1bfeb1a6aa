"""Ctrl-C that never tears a compiled program apart: the first SIGINT asks the work to stop at
the next round boundary, the second abandons at once.

A KeyboardInterrupt raised while XLA compiles or runs can crash the process (a segmentation
fault was observed during the first compilation). Inside :func:`graceful`, SIGINT only sets a
flag; ``defenses.base.run_rounds`` checks it before every round (so also right after the
compilation) and raises :class:`Interrupted`; the CLI then marks its result file
``"interrupted": true`` and exits with status 130. A second SIGINT exits at once (130) without
writing: every finished round is already on disk, written atomically.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

_requested = threading.Event()


class Interrupted(Exception):
    """The user asked to stop (SIGINT); raised at a round boundary."""


def requested() -> bool:
    """Whether a stop was asked for inside :func:`graceful`."""
    return _requested.is_set()


def check() -> None:
    """Raise :class:`Interrupted` when a stop was asked for."""
    if _requested.is_set():
        raise Interrupted("interrupted by the user (Ctrl-C)")


@contextlib.contextmanager
def graceful(message: str = "stopping after the work in progress (Ctrl-C again to abandon it now)"
             ) -> Iterator[None]:
    """Within the block, SIGINT requests a stop instead of raising; restored afterwards.
    Only the main thread can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _requested.is_set():
            print("\nibau-jax: interrupted again: abandoning now", file=sys.stderr, flush=True)
            os._exit(130)
        _requested.set()
        print(f"\nibau-jax: {message}", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
