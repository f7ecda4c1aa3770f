"""nox sessions: `nox -s tests`, `nox -s lint`, `nox -s goldens`.

On CPU machines torch is pinned to the local CPU wheel (a bare `torch` can pull a multi-GB CUDA
build); GPU runners set RLK_TORCH="" to keep the torch already installed in the image, together
with `--no-venv` or `--force-venv-backend none`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "goldens"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("RLK_TORCH", "torch==2.13.0")
ROOT = Path(__file__).parent


def install(session: nox.Session, extras: str = "") -> None:
    if TORCH:
        session.install(TORCH)
    session.install("-e", f".{extras}")


@nox.session
def tests(session: nox.Session) -> None:
    """The CI lane: the whole pytest suite."""
    install(session, "[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks and this file."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")


@nox.session
def goldens(session: nox.Session) -> None:
    """Regenerate the smoke tier from specs/ and require bitwise equality with the committed manifest."""
    install(session)
    committed = json.loads((ROOT / "goldens" / "smoke" / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="rlk-goldens-") as tmp:
        session.run("rlk-conform", "generate", "--tier", "smoke", "--out", tmp)
        fresh = json.loads((Path(tmp) / "manifest.json").read_text())
    want = {e["case_id"]: e["sha256"] for e in committed["files"]}
    got = {e["case_id"]: e["sha256"] for e in fresh["files"]}
    problems = [f"missing from regeneration: {cid}" for cid in sorted(want.keys() - got.keys())]
    problems += [f"not in the committed manifest: {cid}" for cid in sorted(got.keys() - want.keys())]
    problems += [f"bytes differ: {cid}" for cid in sorted(want.keys() & got.keys()) if want[cid] != got[cid]]
    if problems:
        session.error("smoke goldens differ from specs/ — regenerate and commit them:\n  " + "\n  ".join(problems))
    session.log(f"{len(got)} smoke goldens regenerated bit-identical (dataset {fresh['dataset_sha256'][:16]}…)")
