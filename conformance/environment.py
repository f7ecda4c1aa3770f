"""The execution target, numerical settings and software provenance that goldens and reports name
(CONTRACT.md: provenance). One builder for each; every report and manifest uses these.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from conformance import __version__


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name" on Linux) and its core count, e.g.
    ``AMD EPYC 9654 96-Core Processor (2 cores)``; the architecture where the model is unknown."""
    name = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            if line.startswith(("model name", "Model", "Hardware")):
                name = line.partition(":")[2].strip()
                break
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count() or 1} cores)"


def execution_target(device: str) -> dict[str, Any]:
    dev = torch.device(device)
    target: dict[str, Any] = {
        "device": str(dev),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "rlk_conform": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "driver": None,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        target["device_name"] = props.name
        target["compute_capability"] = f"{props.major}.{props.minor}"
        target["cudnn"] = torch.backends.cudnn.version()
        target["driver"] = _driver_version()
    else:
        target["device_name"] = cpu_name()
    return target


def numerical_settings() -> dict[str, Any]:
    return {
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
    }

GENERATOR = f"rlk-conform {__version__}"


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = res.stdout.strip()
    if res.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def environment_provenance() -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
    }
