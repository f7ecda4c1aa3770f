"""The judge works a chunk of rows at a time (bounded memory); the verdicts must not depend on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conformance.judge import invariance, verdicts
from conformance.reference.compute import Golden
from conformance.spec.tolerances import AccuracyRule


def _golden(rng: np.random.Generator, shape: tuple[int, ...]) -> Golden:
    out = rng.standard_normal(shape).astype(np.float32)
    rows = shape[:-1]
    return Golden(out=out, lse=np.zeros(rows, np.float32), error_scale=rng.uniform(0, 1, rows),
                  naive_error=rng.uniform(0, 1e-3, rows), flops=0)


@pytest.mark.parametrize("defect", ["none", "late-outlier", "nan", "many"])
def test_accuracy_metrics_do_not_depend_on_the_chunk_size(defect: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.Generator(np.random.PCG64(5))
    golden = _golden(rng, (2, 3, 40, 16))
    out = torch.from_numpy(golden.out + rng.standard_normal(golden.out.shape).astype(np.float32) * 1e-4)
    if defect == "late-outlier":
        out[1, 2, 39, 7] += 1.0  # in the last chunk when chunks are small
    elif defect == "nan":
        out[1, 0, 5, 3] = float("nan")
    elif defect == "many":
        out[0, 1] += 0.5
    rule = AccuracyRule(atol=1e-3, rtol=1e-3, naive_factor=2.0, max_naive_ratio=2.0, mean_naive_ratio=2.0)
    whole = verdicts.judge_accuracy(out, golden, rule, 1e-3, "strict")
    monkeypatch.setattr(verdicts, "JUDGE_CHUNK", 48)  # three rows of 16 per chunk: 80 chunks
    chunked = verdicts.judge_accuracy(out, golden, rule, 1e-3, "strict")
    assert chunked.status == whole.status
    assert chunked.message == whole.message
    for key, value in whole.metrics.items():
        if isinstance(value, float):
            assert chunked.metrics[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
        else:
            assert chunked.metrics[key] == value, key
    if defect == "late-outlier":
        assert chunked.metrics["worst_index"] == [1, 2, 39, 7] and chunked.status == "fail"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_mismatch_counts_and_locates_across_chunks(dtype: torch.dtype,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randn(3, 4, 50, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    b = a.clone()
    b[2, 3, 49, 7] = torch.nextafter(b[2, 3, 49, 7].float(), torch.tensor(10.0)).to(dtype) + 1
    b[1, 0, 3, 2] = -b[1, 0, 3, 2]
    a[0, 0, 0, 0], b[0, 0, 0, 0] = 0.0, -0.0  # +0 matches −0
    a[0, 0, 0, 1], b[0, 0, 0, 1] = float("nan"), float("nan")  # NaN matches NaN
    monkeypatch.setattr(invariance, "JUDGE_CHUNK", 64)
    found = invariance.bitwise_mismatch(a, b)
    assert found is not None
    assert found.count == 2
    assert found.first_index == (1, 0, 3, 2)
    assert found.first_values == (float(a[1, 0, 3, 2]), float(b[1, 0, 3, 2]))
    flipped, bumped = abs(2 * float(a[1, 0, 3, 2])), abs(float(b[2, 3, 49, 7]) - float(a[2, 3, 49, 7]))
    assert found.max_abs == pytest.approx(max(flipped, bumped))
    assert invariance.bitwise_mismatch(a, a.clone()) is None
