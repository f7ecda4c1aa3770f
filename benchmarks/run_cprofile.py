"""Where the time of one ``rlk-conform`` command goes, in this process: cProfile and Dynamo's counters.

    python benchmarks/run_cprofile.py LABEL run --backend flex --device cuda --filter 'attention/gqa/*'

Runs the command (everything after LABEL, as on the command line) under cProfile and prints its
wall time and exit code, Dynamo's counters (graphs compiled, frames) and compile-time breakdown
(``torch._dynamo.utils.compile_times``: tracing, the Inductor cache, guards), then the 45 functions
with the most cumulative time and the 25 with the most own time. Run it twice with the same
``TORCHINDUCTOR_CACHE_DIR`` for a cold and a warm compile cache; set ``PYTHONPYCACHEPREFIX`` where
the site-packages are read-only, or Python's own compilation of torch's modules is in the figures.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

from conformance.cli import main as cli_main


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    label = sys.argv.pop(1)
    profile = cProfile.Profile()
    start = time.perf_counter()
    rc: object = 0
    profile.enable()
    try:
        cli_main()
    except SystemExit as exc:
        rc = exc.code
    profile.disable()
    print(f"== {label}: wall {time.perf_counter() - start:.1f} s rc {rc}")
    try:
        import torch._dynamo.utils as dynamo_utils

        print("dynamo stats", dict(dynamo_utils.counters["stats"]), "frames", dict(dynamo_utils.counters["frames"]))
        print(dynamo_utils.compile_times(repr="str", aggregate=True))
    except (ImportError, AttributeError, TypeError) as exc:
        print("no Dynamo compile figures:", exc)
    for key, count in (("cumulative", 45), ("tottime", 25)):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(count)
        print(text.getvalue())


if __name__ == "__main__":
    main()
