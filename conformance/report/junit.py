"""JUnit XML: one testcase per record."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from conformance.files import atomic_path
from conformance.judge.records import Record


def write_junit(path: Path, records: Sequence[Record], suite: str) -> None:
    """One testcase per record; classname ``<suite>.<op>.<check>``, name the case id. The forward's
    records form the suite ``<suite>``, the gradients' (checks ``gradient_*``) the suite
    ``<suite>.gradient``: the two judgments are reported apart."""
    root = ET.Element("testsuites")
    forward = [r for r in records if not r.check.startswith("gradient_")]
    gradient = [r for r in records if r.check.startswith("gradient_")]
    for name, part in ((suite, forward), (f"{suite}.gradient", gradient)):
        if part or name == suite:
            _suite(root, name, suite, part)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


def _suite(root: ET.Element, name: str, prefix: str, records: Sequence[Record]) -> None:
    counts = Counter(r.status for r in records)
    ts = ET.SubElement(root, "testsuite", name=name, tests=str(len(records)), failures=str(counts["fail"]),
                       errors=str(counts["error"]), skipped=str(counts["skip"]))
    for r in records:
        tc = ET.SubElement(ts, "testcase", classname=f"{prefix}.{r.op}.{r.check}", name=r.case_id)
        if r.status == "fail":
            ET.SubElement(tc, "failure", message=r.message[:500]).text = json.dumps(r.to_json()["metrics"])
        elif r.status == "error":
            ET.SubElement(tc, "error", message=r.message[:500])
        elif r.status == "skip":
            ET.SubElement(tc, "skipped", message=r.message[:500])
