"""Named places where a test can kill the process, to prove that runs survive a kill anywhere.

``LMCOH_CRASH_AT=NAME`` (or ``NAME:N``, the N-th visit) makes the process SIGKILL itself the
moment it reaches `point(NAME)`: no cleanup, no flush, exactly like an OOM kill or a pulled
plug. ``NAME[:N]@SIGINT`` sends that signal instead (a Ctrl-C at a known place, not at a
moment a test can only guess). Unset (always, outside tests), `point` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "LMCOH_CRASH_AT"
_visits: dict[str, int] = {}


def point(name: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    target, _, how = target.partition("@")
    wanted, _, nth = target.partition(":")
    if wanted != name:
        return
    _visits[name] = _visits.get(name, 0) + 1
    if _visits[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, how or "SIGKILL"))
