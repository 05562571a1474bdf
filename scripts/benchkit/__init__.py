"""The benchmark harness behind ``scripts/bench`` (entry point: scripts/bench.py).

Modules, one job each: ``harness`` (rows, timing, phases), ``children`` (the processes the run
starts, stopped by PID), ``peers`` (Redis and NATS servers, found or skipped), ``workloads``
(one module per group of rows), ``worker`` (the child processes: writers, watchers, joining
nodes), ``report`` (the table, the JSON, the comparison with an earlier run) and ``internals``
(the only module that touches non-public names of node/ and broker/). Importing this package
loads nothing.
"""
