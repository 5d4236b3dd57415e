"""Fanout's benchmark suite: Fanout side by side with the limit (``make bench``).

- :mod:`bench.run` starts the fake LLM and the service as real processes, drives
  the work, and writes ``bench/results.md``.
- :mod:`bench.limit` is the limit: a bare ``asyncio.gather`` of the same calls, in a
  process of its own so its CPU and memory can be read apart.
- :mod:`bench.procs` starts, measures (``/proc``) and stops those processes.
- :mod:`bench.client` is what a caller of Fanout does: post a job, follow its stream.
"""
