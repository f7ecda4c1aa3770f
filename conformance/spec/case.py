"""A case: one immutable value that travels the whole way (spec → golden → run → report), its
parameters' vocabulary and its id.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

OPS = ("attention", "kv_cache_attention")
#: The layouts of those ops that real kernels use (conformance.spec.layouts): packed and paged.
LAYOUT_OPS = ("varlen_attention", "paged_kv_attention")
TIERS = ("smoke", "standard", "full")
DTYPES = ("float32", "bfloat16", "float16")
MASKS = ("none", "right_pad", "left_pad", "holes", "all_masked")
DISTS = ("normal", "uniform", "large_logits", "near_ties")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MASK_SHORT = {"none": "", "right_pad": "rightpad", "left_pad": "leftpad", "holes": "holes",
              "all_masked": "allmasked"}
VARIANTS = ("window", "softcap", "sinks")
DIST_SHORT = {"normal": "", "uniform": "uniform", "large_logits": "largelogits", "near_ties": "neartie"}


@dataclass(frozen=True)
class Case:
    """One golden case. Immutable; ``id`` is its key in files, reports and reproducers.

    Shapes follow CONTRACT.md: ``q [batch, hq, sq, d]``, ``k, v [batch, hkv, skv, d]``. For the
    KV-cache op ``skv = s_past + s_new`` and ``sq = s_new``; ``split_points`` lists the cache
    lengths (S_past values) the case is also meant to be run at, ``s_past`` first. ``grad``: the
    golden also holds the exact gradients dQ, dK, dV for a seeded upstream gradient, and the
    gradient checks run on it.

    The attention variants (docs/backends.md, the terms table): ``window`` (left, right) in keys
    relative to the bottom-right aligned diagonal, -1 unbounded; ``softcap`` > 0 caps the scaled
    logits to ``softcap·tanh(s/softcap)`` (None: off); ``sinks`` one float32 logit per query head
    that joins every row's softmax denominator (None: no sinks).
    """

    id: str
    op: str
    family: str
    tier: str
    batch: int
    hq: int
    hkv: int
    d: int
    sq: int
    skv: int
    dtype: str
    causal: bool
    scale: float | None
    mask: str
    dist: str
    seed: int
    preset: str | None = None
    s_past: int | None = None
    split_points: tuple[int, ...] = ()
    grad: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float | None = None
    sinks: tuple[float, ...] | None = None

    @property
    def variants(self) -> tuple[str, ...]:
        """The attention variants this case uses, in VARIANTS order ("window", "softcap", "sinks")."""
        used = {"window": self.window != (-1, -1), "softcap": self.softcap is not None,
                "sinks": self.sinks is not None}
        return tuple(v for v in VARIANTS if used[v])

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def s_new(self) -> int | None:
        return None if self.s_past is None else self.skv - self.s_past

    @property
    def effective_scale(self) -> float:
        return 1.0 / math.sqrt(self.d) if self.scale is None else self.scale

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the stored inputs and expected outputs of this case."""
        el = DTYPE_BYTES[self.dtype]
        q = self.batch * self.hq * self.sq * self.d
        kv = 2 * self.batch * self.hkv * self.skv * self.d
        rows = self.batch * self.hq * self.sq
        forward = (q + kv) * el + q * 4 + self.batch * self.skv + rows * (4 + 8 + 8) + 4 * len(self.sinks or ())
        if not self.grad:
            return forward
        keys = self.batch * self.hkv * self.skv
        # grad_out, then dQ, dK, dV in float32 and two float64 statistics per row / key of each.
        return forward + q * el + (q + kv) * 4 + (rows + 2 * keys) * 16

    @property
    def working_bytes(self) -> int:
        """Stored tensors plus the float64 copies of the inputs the reference holds while computing."""
        elements = self.batch * (self.hq * self.sq + 2 * self.hkv * self.skv) * self.d
        return self.tensor_bytes + 8 * elements * (3 if self.grad else 1)


@dataclass(frozen=True)
class Preset:
    name: str
    hq: int
    hkv: int
    d: int
    display: str = ""


def scale_tag(scale: float) -> str:
    return repr(scale).replace("-", "m").replace(".", "p").replace("+", "")


def case_id(op: str, family: str, *, model: str, batch: int, sq: int, skv: int, s_past: int | None, dtype: str,
            causal: bool, mask: str, dist: str, scale: float | None, seed: int | None = None,
            grad: bool = False, window: tuple[int, int] = (-1, -1), softcap: float | None = None,
            sinks: tuple[float, ...] | None = None, sinks_drawn: bool = True) -> str:
    """The id of a case (docs/golden-format.md): ``<op>/<family>/<model>-b<B>-<shape>-<dtype>-<causal|noncausal>``
    then the mask, distribution and scale when they are not the defaults, the variants
    (``win<left>.<right>`` with ``inf`` for -1, ``softcap<tag>``, ``sinks`` or ``sinks<hash>`` for
    values given in the spec rather than drawn), ``-grad`` for a case with
    gradients, and ``-seed<seed>`` for a drawn
    case (its seed is not derived from the id, so it must be part of the key). ``model`` is a preset
    name or ``hq<Hq>-hkv<Hkv>-d<D>``; the shape ``sq<Sq>-skv<Skv>``, or ``past<S_past>-new<Sq>`` for the
    KV-cache op. Ids depend on the parameters only, so adding cases never renames existing ones."""
    shape = f"sq{sq}-skv{skv}" if op == "attention" else f"past{s_past}-new{sq}"
    parts = [model, f"b{batch}", shape, DTYPE_SHORT[dtype], "causal" if causal else "noncausal", MASK_SHORT[mask],
             DIST_SHORT[dist], "" if scale is None else f"scale{scale_tag(scale)}", window_tag(window),
             "" if softcap is None else f"softcap{scale_tag(softcap)}", sinks_tag(sinks, sinks_drawn),
             "grad" if grad else "", "" if seed is None else f"seed{seed}"]
    return f"{op}/{family}/" + "-".join(x for x in parts if x)


def window_tag(window: tuple[int, int]) -> str:
    if window == (-1, -1):
        return ""
    return "win" + ".".join("inf" if w < 0 else str(w) for w in window)


def drawn_sinks(seed: int, hq: int) -> tuple[float, ...]:
    """The seeded sink logits of a case whose spec says ``sinks: true`` (docs/golden-format.md):
    ``numpy.random.Generator(numpy.random.PCG64([seed, 2])).normal(0.5, 2.0, hq)`` rounded to float32."""
    rng = np.random.Generator(np.random.PCG64([seed, 2]))
    return tuple(float(x) for x in rng.normal(SINK_MEAN, SINK_STD, hq).astype(np.float32))


SINK_MEAN, SINK_STD = 0.5, 2.0  # drawn sinks: comparable to normal logits, some dominating a row


def sinks_tag(sinks: tuple[float, ...] | None, drawn: bool = True) -> str:
    if sinks is None:
        return ""
    if drawn:
        return "sinks"
    digest = hashlib.sha256(np.asarray(sinks, dtype=np.float32).tobytes()).hexdigest()[:8]
    return f"sinks{digest}"


_ID_RE = re.compile(r"^(?P<model>.+?)-b(?P<batch>\d+)-"
                    r"(?:sq(?P<sq>\d+)-skv(?P<skv>\d+)|past(?P<past>\d+)-new(?P<new>\d+))"
                    r"-(?P<dtype>fp32|bf16|fp16)-(?P<causal>causal|noncausal)(?P<rest>(?:-[^/]+)?)$")
_MODEL_RE = re.compile(r"^hq(?P<hq>\d+)-hkv(?P<hkv>\d+)-d(?P<d>\d+)$")


def parse_case_id(cid: str) -> dict[str, Any] | None:
    """The parameters a case id spells out (the inverse of :func:`case_id`): op, family, model,
    batch, sq, skv, s_past (KV-cache op), dtype, causal, mask, dist, scale (its tag), seed, and hq,
    hkv, d, group when the model is not a preset. None for an id of another shape."""
    op, _, rest = cid.partition("/")
    family, _, variant = rest.rpartition("/")
    m = _ID_RE.match(variant)
    if op not in OPS or not family or m is None:
        return None
    dtype = {short: name for name, short in DTYPE_SHORT.items()}[m["dtype"]]
    params: dict[str, Any] = {"op": op, "family": family, "model": m["model"], "batch": int(m["batch"]),
                              "dtype": dtype, "causal": m["causal"] == "causal", "mask": "none", "dist": "normal",
                              "scale": "default", "grad": False, "window": (-1, -1), "softcap": None,
                              "sinks": False}
    if m["sq"] is not None:
        params.update(sq=int(m["sq"]), skv=int(m["skv"]))
    else:
        params.update(s_past=int(m["past"]), sq=int(m["new"]), skv=int(m["past"]) + int(m["new"]))
    masks = {short: name for name, short in MASK_SHORT.items() if short}
    dists = {short: name for name, short in DIST_SHORT.items() if short}
    for token in m["rest"].split("-")[1:]:
        if token in masks:
            params["mask"] = masks[token]
        elif token in dists:
            params["dist"] = dists[token]
        elif token == "grad":
            params["grad"] = True
        elif token.startswith("win") and token.count(".") == 1:
            params["window"] = tuple(-1 if w == "inf" else int(w) for w in token[3:].split("."))
        elif token.startswith("softcap"):
            params["softcap"] = token.removeprefix("softcap")
        elif token.startswith("sinks"):
            params["sinks"] = True
        elif token.startswith("scale"):
            params["scale"] = token.removeprefix("scale")
        elif token.startswith("seed") and token[4:].isdigit():
            params["seed"] = int(token[4:])
    model = _MODEL_RE.match(m["model"])
    if model is not None:
        hq, hkv = int(model["hq"]), int(model["hkv"])
        params.update(hq=hq, hkv=hkv, d=int(model["d"]), group=hq // hkv if hkv else None)
    return params
