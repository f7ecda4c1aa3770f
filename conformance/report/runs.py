"""Finished runs to render: the JSON reports loaded and labelled, and the presets that name
each preset's head dim.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.errors import ConformanceError
from conformance.locations import spec_dir
from conformance.report.json import load_report


@dataclass(frozen=True)
class BackendRun:
    """One report, with the label it is shown under (unique among the reports of one page)."""

    path: Path
    label: str
    report: dict[str, Any]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.report["records"]

    @property
    def target(self) -> dict[str, Any]:
        return self.report.get("execution_target") or {}

    @property
    def goldens(self) -> dict[str, Any]:
        return self.report.get("goldens") or {}

    @property
    def search(self) -> dict[str, Any] | None:
        """The property search's settings when this report is one (``rlk-conform check``), else None."""
        return self.report.get("search")

    @property
    def source(self) -> str:
        """What was judged: the goldens' tier and dataset hash, or the property search's profile."""
        if self.search is not None:
            examples = sum(int(r.get("examples_run") or 0) for r in self.search.get("results") or [])
            budget = self.search.get("time_budget_s")
            return (f"property search, profile {self.search.get('profile')}, {examples} examples"
                    + (f", {budget:g} s per property" if budget else ""))
        g = self.goldens
        return f"{g.get('tier')} goldens `{str(g.get('dataset_sha256'))[:12]}`"

    @property
    def requested(self) -> str:
        b = self.report["backend"]
        return str(b.get("requested") or b.get("used") or "?")


def _tier(report: dict) -> str:
    return str((report.get("goldens") or {}).get("tier") or "")


def load_runs(paths: Sequence[Path]) -> list[BackendRun]:
    """Load every report; labels are the requested backend (``(check)`` for a property search), made
    unique by the goldens' tier where that tells them apart, then by device name, then by index."""
    reports = [(p, load_report(p)) for p in paths]
    labels = [str(r["backend"].get("requested") or r["backend"].get("used") or "?")
              + (" (check)" if "search" in r else "") for _, r in reports]
    tiers = {lab: {_tier(r) for lb, (_, r) in zip(labels, reports) if lb == lab} for lab in labels}
    labels = [f"{lab} · {_tier(r)}" if labels.count(lab) > 1 and len(tiers[lab]) > 1 else lab
              for lab, (_, r) in zip(labels, reports)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} · {(r.get('execution_target') or {}).get('device_name') or r['backend'].get('device')}"
                  if labels.count(lab) > 1 else lab for lab, (_, r) in zip(labels, reports)]
    seen: Counter[str] = Counter(labels)
    if len(seen) < len(labels):
        labels = [f"{lab} #{i + 1}" if seen[lab] > 1 else lab for i, lab in enumerate(labels)]
    return [BackendRun(p, lab, r) for lab, (p, r) in zip(labels, reports)]


def load_preset_dims(path: Path | None) -> dict[str, int]:
    """Preset name → head dim from a presets.yaml (the shipped one when ``path`` is None). An explicit
    ``path`` that is missing or invalid raises :class:`~conformance.errors.SpecError`/``ConformanceError``."""
    from conformance.spec.load import load_presets

    if path is None:
        path = spec_dir() / "presets.yaml"
    elif not path.is_file():
        raise ConformanceError(f"{path}: no such presets file")
    return {name: p.d for name, p in load_presets(path).items()}
