"""A process for tests/test_loadtest_cprofile.py: warms up, says it is ready (touches
``BUSY_READY``), then calls ``tick`` until it is stopped."""

from __future__ import annotations

import os
import pathlib
import time


def warm_up() -> int:
    return sum(range(1000))


def tick(n: int) -> int:
    return n * 2


if __name__ == "__main__":
    for _ in range(100):
        warm_up()
    pathlib.Path(os.environ["BUSY_READY"]).touch()
    n = 0
    while True:
        tick(n)
        n += 1
        if n % 1000 == 0:
            time.sleep(0.001)
