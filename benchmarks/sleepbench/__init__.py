"""The sleep/wake benchmark, one job per module (entry point: ``benchmarks/bench_sleep.py``).

- ``common``     units, progress lines, timing and device/host helpers (no measurement logic)
- ``targets``    the SPEC's targets, in one table
- ``workloads``  model-like tensors, registered buffers, KV cache, round-trip checks (also soak.py's)
- ``impls/``     one adapter per implementation: ``ext`` (this project), ``vllm_cumem`` (vLLM's
                 method), ``tms`` (torch_memory_saver), ``limit`` (the pinned-copy limit)
- ``workers``    what one measurement process does (``bench_sleep.py --worker MODE``)
- ``runner``     the parent: one fresh process per measurement, peers, configuration
- ``report``     rows, verdicts, the markdown table, results.json and the plot

To add a peer: an adapter in ``impls/`` (``region``/``sleep``/``wake``/``pool_bytes``/``stats``),
one line in ``impls.make_impl`` and a call in ``runner.run_peers``. To add a workload: a function in
``workloads``, a worker in ``workers.WORKERS``, rows in ``report``.
"""
