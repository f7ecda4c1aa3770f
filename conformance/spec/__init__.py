"""Where a case is born: the YAML specs validated (file:line errors) and expanded into immutable cases.

- ``case`` — :class:`~conformance.spec.case.Case`, its vocabulary (ops, dtypes, masks, …) and its id;
- ``yamlsource`` — safe YAML loading that remembers the line of every key;
- ``load`` — spec files → cases (families, grids, tiers, presets);
- ``tolerances`` — ``tolerances.yaml``: every threshold, looked up fail-closed;
- ``inputs`` — the seeded inputs of a case, exactly representable in its dtype.
"""
