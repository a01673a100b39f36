"""``python -m tools.loadtest.cprofiled <module> <out.prof>``: run a service module
(``services.signaling``) under cProfile, recording only between two signals.

The load harness's ``--cprofile`` starts the services this way and sends
:data:`START_SIGNAL` when the load begins and :data:`DUMP_SIGNAL` when it ends, so
start-up, set-up and shutdown stay out of the profile. Unlike py-spy's GIL-held samples
(``--profile``), this counts every Python function call exactly; what it cannot see is
time outside Python (syscalls, the loop's C code), and it slows the process, so its
times (the process's CPU time, not wall time) are shares, not costs.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
import time
from pathlib import Path

# Real-time signals nothing else in a service handles (every service logs its tasks on SIGUSR1);
# where there are none (macOS), SIGUSR2 and SIGWINCH, which no service handles either.
_RT = getattr(signal, "SIGRTMIN", None)
START_SIGNAL: int = _RT + 3 if _RT is not None else signal.SIGUSR2
DUMP_SIGNAL: int = _RT + 4 if _RT is not None else signal.SIGWINCH


def profile_path(directory: Path, service: str, instance: int) -> Path:
    """Where the ``instance``-th (from 1) process of ``service`` dumps its profile."""
    return directory / f"cprofile-{service}-{instance}.prof"


def main(argv: list[str]) -> None:
    module, out = argv
    # CPU time, not wall time: a wait (a sleep, the event loop's poll) costs nothing
    profile = cProfile.Profile(time.process_time)

    def start(*_: object) -> None:
        profile.enable()

    def dump(*_: object) -> None:
        profile.disable()
        profile.dump_stats(out + ".part")
        os.replace(out + ".part", out)  # whole, or not there

    signal.signal(START_SIGNAL, start)
    signal.signal(DUMP_SIGNAL, dump)
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
