"""The execution target and numerical settings a report must name (CONTRACT.md: provenance)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Any

import torch

from . import __version__


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
        target["device_name"] = platform.processor() or platform.machine()
    return target


def numerical_settings() -> dict[str, Any]:
    return {
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
    }
