"""Python's thread switch interval, shortened while a background thread works beside images or loads.

A background thread that runs Python for seconds (the head start importing diffusers, the warm-up tracing with
dynamo) holds the interpreter between forced switches. A foreground thread that drops it at every torch call or
file read then waits up to the switch interval (5 ms by default) each time it wants it back. Measured on an H100:
beside the tracing thread a LoRA read took 14-28 s instead of 0.4 s and steps 1-4 s instead of 0.17 s; beside the
head start's import, reading the 12 GB transformer took 3.4 s instead of 0.9 s and the import itself 7.7 s instead
of 3.6-4.8 s. With a 0.1 ms interval those waits hide behind the GPU's and the disk's own work.
Reference-counted: the interval goes back to what it was when the last user is done.
"""

from __future__ import annotations

import contextlib
import sys
import threading

SHORT_S = 1e-4  # the interval while a background thread works (Python's default: 5e-3)
_LOCK = threading.Lock()
_USERS = [0, None]  # users now, the interval to restore after the last


def _enter() -> None:
    with _LOCK:
        if _USERS[0] == 0:
            _USERS[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(SHORT_S, _USERS[1]))
        _USERS[0] += 1


def _exit() -> None:
    with _LOCK:
        _USERS[0] -= 1
        if _USERS[0] == 0:
            sys.setswitchinterval(_USERS[1])


@contextlib.contextmanager
def short():
    """Within this block (on any thread), the process switches threads every SHORT_S seconds at most."""
    _enter()
    try:
        yield
    finally:
        _exit()
