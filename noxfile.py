"""nox sessions: `nox -s tests`, `nox -s slow`, `nox -s lint`, `nox -s goldens`, `nox -s conformance`,
`nox -s nightly`.

On CPU machines torch is pinned to the local CPU wheel (a bare `torch` can pull a multi-GB CUDA
build); GPU runners set RLK_TORCH="" to keep the torch already installed in the image. Without a
virtualenv (`nox --no-venv`, or `--force-venv-backend none`) nothing is installed: the sessions run
on nox's own interpreter, where the package must already be importable (installed, or on
PYTHONPATH); that is how an offline GPU runner runs the nightly lane (README.md, "The nightly GPU lane").
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "goldens"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("RLK_TORCH", "torch==2.13.0")
ROOT = Path(__file__).parent


def has_venv(session: nox.Session) -> bool:
    """False under `--no-venv` / `--force-venv-backend none` (nox's PassthroughEnv)."""
    return session.venv_backend != "none"


def pip_install(session: nox.Session, *args: str) -> None:
    """`session.install`, or nothing (with a log line) when the session has no virtualenv."""
    if not has_venv(session):
        session.log(f"no virtualenv (--no-venv): not installing {' '.join(args)}; using {sys.executable}")
        return
    session.install(*args)


def install(session: nox.Session, extras: str = "") -> None:
    """torch (RLK_TORCH; empty: keep the installed one) and this package, editable, with ``extras``."""
    if not has_venv(session):
        session.log(f"no virtualenv (--no-venv): installing nothing; rlk-conform must be importable by "
                    f"{sys.executable} (installed, or on PYTHONPATH)")
        return
    if TORCH:
        session.install(TORCH)
    session.install("-e", f".{extras}")


def python(session: nox.Session) -> str:
    """The session's interpreter: the virtualenv's, or without one the interpreter running nox."""
    return "python" if has_venv(session) else sys.executable


@nox.session
def tests(session: nox.Session) -> None:
    """The CI lane (the README's test command, .ci/run): the pytest suite without the slow tests, on
    every core."""
    install(session, "[test]")
    session.run(python(session), "-m", "pytest", "-q", "-n", "auto", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """The tests marked slow (larger shapes, cold compiles), kept out of the CI lane."""
    install(session, "[test]")
    session.run(python(session), "-m", "pytest", "-q", "-n", "auto", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks and this file."""
    pip_install(session, "ruff>=0.5")
    session.run(python(session), "-m", "ruff", "check", ".")


@nox.session
def goldens(session: nox.Session) -> None:
    """Regenerate the smoke tier from specs/ and require bitwise equality with the committed manifest."""
    install(session)
    committed = json.loads((ROOT / "goldens" / "smoke" / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="rlk-goldens-") as tmp:
        session.run(python(session), "-m", "conformance", "generate", "--tier", "smoke", "--out", tmp)
        fresh = json.loads((Path(tmp) / "manifest.json").read_text())
    want = {e["case_id"]: e["sha256"] for e in committed["files"]}
    got = {e["case_id"]: e["sha256"] for e in fresh["files"]}
    problems = [f"missing from regeneration: {cid}" for cid in sorted(want.keys() - got.keys())]
    problems += [f"not in the committed manifest: {cid}" for cid in sorted(got.keys() - want.keys())]
    problems += [f"bytes differ: {cid}" for cid in sorted(want.keys() & got.keys()) if want[cid] != got[cid]]
    if problems:
        session.error("smoke goldens differ from specs/ — regenerate and commit them:\n  " + "\n  ".join(problems))
    session.log(f"{len(got)} smoke goldens regenerated bit-identical (dataset {fresh['dataset_sha256'][:16]}…)")


CPU_BACKENDS = ["reference", "naive-fp32", "naive", "sdpa-math", "sdpa"]


@nox.session
@nox.parametrize("backend", CPU_BACKENDS)
def conformance(session: nox.Session, backend: str) -> None:
    """`rlk-conform run` of one backend over the committed smoke goldens, JSON and JUnit in reports/.

    A backend's known-failure list, known-failures/<backend>.yaml, is used when it exists.
    """
    install(session)
    out = ROOT / "reports"
    out.mkdir(exist_ok=True)
    args = ["--report-json", str(out / f"run-{backend}.json"), "--junit", str(out / f"run-{backend}.xml")]
    known = ROOT / "known-failures" / f"{backend}.yaml"
    if known.is_file():
        args += ["--known-failures", str(known)]
    session.run(python(session), "-m", "conformance", "run", "--backend", backend, *args, *session.posargs)


@nox.session
def nightly(session: nox.Session) -> None:
    """The GPU lane: standard-tier goldens, every CUDA backend (run + nightly property search), JSON,
    JUnit and HTML reports in nightly/. On a GPU runner: `RLK_TORCH= nox -s nightly` (keeps the
    image's CUDA torch), or offline `nox --no-venv -s nightly` with the package importable; extra
    arguments go to `python -m conformance.nightly` (see its --help)."""
    install(session)
    session.run(python(session), "-m", "conformance.nightly", *session.posargs)
