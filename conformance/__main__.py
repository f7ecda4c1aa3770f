"""``python -m conformance``: the same command line as ``rlk-conform``."""

from conformance.cli import main

main()
