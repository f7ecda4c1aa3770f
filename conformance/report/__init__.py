"""Where a verdict is printed: reports of records for people and dashboards.

- ``json`` — the JSON report (docs/report-format.md): build, write, read, merge;
- ``junit`` — JUnit XML;
- ``console`` — the terminal summary, profile and search tables;
- ``runs``, ``markup``, ``plots``, ``html``, ``markdown`` — the offline HTML page and the Markdown summary
  (CSS and JS in ``assets/``).
"""
