"""The dmcall load-test harness: ``python -m tools.loadtest --help`` (``make loadtest``).

Simulated users with one to three WebSocket devices each place calls at a target rate
with a mix of outcomes, through the public API only; the harness measures time to ring,
time to connect, missed-call lateness, errors and losses, next to the floor (broker
one-way latency, Redis round trip) measured in the same run. The ``make bench-*``
benchmarks (``bench_*.py``) are built from the same parts. See docs/performance.md.
"""
