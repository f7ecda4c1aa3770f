"""rlk-conform: numerical conformance harness and exact golden-data generator for attention kernels."""

__version__ = "0.1.0"
