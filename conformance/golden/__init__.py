"""Goldens on disk: the HDF5 format, the manifest, generation, verification, reproducers and releases.

- ``format`` — write and read one golden file (docs/golden-format.md);
- ``manifest`` — ``manifest.json`` of a golden directory, and selecting the files a run reads;
- ``generate`` — specs → golden files and manifest (``rlk-conform generate``);
- ``verify`` — checksums, schema and bit-identical regeneration (``rlk-conform verify``);
- ``reproducer`` — shrunk counterexamples as golden files, and the regression set (``promote``);
- ``release`` — the vendor bundle and its verification (``rlk-conform release``).
"""
