"""Property search: Hypothesis draws cases from the space the specs describe and shrinks failures.

- ``strategies`` — the space of one tier of the specs, and drawing a case from it;
- ``properties`` — each property: its draws and its check;
- ``layout_strategies``, ``layout_properties`` — the ``pack`` and ``page`` properties over drawn pack
  compositions, judged by the run's layout checks;
- ``engine`` — searching a property on a backend (budgets, shrinking, reproducers); prints nothing;
- ``replay`` — a reproducer re-run on a backend.
"""
