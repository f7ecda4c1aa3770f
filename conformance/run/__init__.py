"""Where a backend is called: golden cases streamed through a backend and judged.

- ``settings`` — what a run checks and with which rules (one parser for the CLI and the pytest plugin);
- ``invoker`` — every backend call, with the op contract checked;
- ``case`` — every requested check on one golden case;
- ``loop`` — golden files streamed one at a time through a per-case judge;
- ``isolation`` — ``--isolate``: cases judged in a restartable worker process;
- ``wire`` — the messages between a run and its worker processes (``--isolate``, ``--devices``);
- ``profiling`` — ``--profile``: seconds per phase, peak memory, largest case.
"""
