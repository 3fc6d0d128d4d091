"""pynetdicom times its ARTIM and idle (network_timeout) timers with the wall clock. A clock step (NTP correcting a
drifted clock, a virtual machine resumed) then looks like minutes of silence, and every association under way is
aborted, its instance unanswered, although nothing was wrong with the peer. The node runs for months, so its
timers use the monotonic clock instead, which never steps."""

from __future__ import annotations

import time
import types

import pynetdicom.timer

_MONOTONIC = types.SimpleNamespace(time=time.monotonic)


def use_monotonic_timers() -> None:
    """Make pynetdicom's Timer measure with time.monotonic (it reads only `time.time` of its own `time` name)."""
    pynetdicom.timer.time = _MONOTONIC  # type: ignore[attr-defined]

