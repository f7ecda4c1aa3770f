"""Where a golden is computed: the exact reference, every element correctly rounded once to float32.

- ``compute`` — :func:`~conformance.reference.compute.compute_reference`: the three tiers for a case;
- ``float64`` — tier 1: float64 with a rigorous error bound (and the naive same-dtype model);
- ``double_double`` — tier 2: double-double arithmetic in torch;
- ``exact`` — tier 3: exact integers, rationals and interval arithmetic;
- ``rounding`` — float32 rounding intervals and correct rounding of rationals;
- ``crosscheck`` — an independent 50-digit mpmath recomputation (shares no code with the tiers).
"""
