"""pynetdicom times its ARTIM and idle (network_timeout) timers with the wall clock. A clock step (NTP correcting a
drifted clock, a virtual machine resumed) then looks like minutes of silence, and every association under way is
aborted, its instance unanswered, although nothing was wrong with the peer. The node runs for months, so its
timers use the monotonic clock instead, which never steps."""

from __future__ import annotations

import time
import types

import pynetdicom.timer

# the `time` module as pynetdicom's timer sees it: everything of the real one, but time() is monotonic
_MONOTONIC = types.ModuleType("time")
_MONOTONIC.__dict__.update(vars(time))
_MONOTONIC.time = time.monotonic


def use_monotonic_timers() -> None:
    """Make pynetdicom's Timer measure with time.monotonic. Done when this module is imported, before any
    association of the node's exists (a timer started on one clock and read on the other would never expire);
    calling it again is harmless."""
    pynetdicom.timer.time = _MONOTONIC  # type: ignore[attr-defined]


use_monotonic_timers()
