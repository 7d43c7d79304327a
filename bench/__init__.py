"""Benchmarks of the hub: ``scripts/bench <workload>`` (``python -m bench``).

Workloads (one module each):

- ``push`` (:mod:`bench.push`): HTTP push latency and throughput against a real
  hub process, next to the bare storage ceiling (:mod:`bench.ceiling`).
- ``relay`` (:mod:`bench.fanout`): WebSocket fan-out through the bare
  Starlette relay (:mod:`bench.relay_starlette`), the reference point.
- ``fanout`` (:mod:`bench.fanout`): the same phases against a real hub process
  and the bare relay in one run, and their ratio.

The WebSocket load comes from a separate process (:mod:`bench.loadgen`), so
its CPU use can be measured and kept apart from the servers'. Every number is
the median of several runs; results are written to ``bench/results/``.
"""
