"""Where a verdict is made: pure functions from tensors and rules to records. Nothing here prints.

- ``records`` — :class:`~conformance.judge.records.Record` (one outcome) and the check names;
- ``verdicts`` — accuracy (relation A) and elementwise comparisons;
- ``invariance`` — relation I: the bitwise comparison every invariance check uses;
- ``transforms`` — a case's inputs sliced and concatenated into the calls invariance compares;
- ``known_failures`` — expected failures of a backend.
"""
