"""The nightly lane refuses clearly when there is no GPU, and nox exposes the lanes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the lane would really run")
def test_nightly_without_cuda_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "conformance.nightly", "--out", str(tmp_path / "n")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: no CUDA backend is available on this machine; the nightly "
                                               "lane needs a GPU"]
    assert not (tmp_path / "n").exists()


def test_noxfile_declares_the_ci_conformance_and_nightly_sessions() -> None:
    text = (ROOT / "noxfile.py").read_text()
    for session in ("def tests(", "def lint(", "def goldens(", "def conformance(", "def nightly("):
        assert session in text
