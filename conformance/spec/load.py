"""Op specs: validate a YAML spec file and expand its families into immutable :class:`Case` values.

A spec file (``specs/attention.yaml``, ``specs/kv_cache_attention.yaml``) declares *families*; each
family lists, per tier, grids of case parameters (a scalar is one value, a list is an axis of the
cartesian product). Tiers are cumulative: ``smoke`` ⊂ ``standard`` ⊂ ``full``. Every error is
raised as a :class:`SpecError` naming file, line, field and reason before anything is computed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conformance import locations
from conformance.errors import SpecError
from conformance.spec.case import OPS, TIERS, Case, Preset, case_id, drawn_sinks
from conformance.spec.layouts import LAYOUT_NAMES, MAX_PACK_SEQUENCES, LayoutCase, compose, layout_group, parse_token
from conformance.spec.yamlsource import Loc, YamlDocument, dotted, load_yaml

DEFAULT_MEMORY_CAP_BYTES = 8 * 1024**3
MAX_GRID_CASES = 100_000  # a typo like a 10^6-value axis must not hang `specs` or `generate`
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
Strict = ConfigDict(extra="forbid", strict=True)


class LayoutSpec(BaseModel):
    """One ``layouts`` entry of a family (conformance.spec.layouts): packs of its cases, paged or not."""

    model_config = Strict
    layout: Literal["varlen", "paged"]
    packs: list[list[str]] = Field(min_length=1)
    page_sizes: list[int] | None = None


class FamilySpec(BaseModel):
    model_config = Strict
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    tiers: dict[Literal["smoke", "standard", "full"], list[dict[str, Any]]]
    layouts: dict[Literal["smoke", "standard", "full"], list[LayoutSpec]] = Field(default_factory=dict)


class PresetSpec(BaseModel):
    model_config = Strict
    name: str
    hq: int = Field(gt=0)
    hkv: int = Field(gt=0)
    d: int = Field(gt=0)


class PresetFile(BaseModel):
    model_config = Strict
    schema_version: Literal[1]
    presets: dict[str, PresetSpec]


class OpSpecFile(BaseModel):
    model_config = Strict
    schema_version: Literal[1]
    op: Literal["attention", "kv_cache_attention"]
    seed: int = Field(ge=0, lt=2**63)
    presets: str
    description: str = ""
    families: dict[str, FamilySpec]


class CaseParams(BaseModel):
    """Parameters of one case after grid expansion (before preset resolution)."""

    model_config = Strict
    preset: str | None = None
    hq: int | None = Field(default=None, gt=0, le=1024)
    hkv: int | None = Field(default=None, gt=0, le=1024)
    d: int | None = Field(default=None, gt=0, le=1024)
    batch: int = Field(gt=0, le=4096)
    sq: int | None = Field(default=None, gt=0, le=1 << 20)
    skv: int | None = Field(default=None, gt=0, le=1 << 20)
    s_past: int | None = Field(default=None, ge=0, le=1 << 20)
    s_new: int | None = Field(default=None, gt=0, le=1 << 20)
    split_offsets: list[int] | None = None
    dtype: Literal["float32", "bfloat16", "float16"]
    causal: bool
    scale: float | Literal["default"] = "default"
    mask: Literal["none", "right_pad", "left_pad", "holes", "all_masked"] = "none"
    dist: Literal["normal", "uniform", "large_logits", "near_ties"] = "normal"
    grad: bool = False  # also the exact gradients dQ, dK, dV (and the gradient checks)
    window_left: int = Field(default=-1, ge=-1, le=1 << 20)  # keys before the diagonal a row sees; -1: all
    window_right: int = Field(default=-1, ge=-1, le=1 << 20)  # keys after the diagonal a row sees; -1: all
    softcap: float | None = None  # cap·tanh(s/cap) of the scaled logits; > 0
    sinks: bool | list[float] = False  # true: seeded per-head sink logits; or the Hq values themselves


LIST_VALUED = {"split_offsets"}


@dataclass
class OpSpec:
    """A validated op spec and the cases it declares."""

    path: Path
    op: str
    seed: int
    sha256: str
    cases: list[Case] = field(default_factory=list)
    layouts: list[LayoutCase] = field(default_factory=list)  # packed and paged compositions of the cases

    def cases_for_tier(self, tier: str) -> list[Case]:
        level = TIERS.index(tier)
        return [c for c in self.cases if TIERS.index(c.tier) <= level]

    def layouts_for_tier(self, tier: str) -> list[LayoutCase]:
        level = TIERS.index(tier)
        return [c for c in self.layouts if TIERS.index(c.tier) <= level]


def pydantic_error(doc: YamlDocument, err: ValidationError, prefix: Loc = ()) -> SpecError:
    first = err.errors()[0]
    loc = (*prefix, *first["loc"])
    # pydantic appends union/tag names (e.g. 'literal['default']') to loc; keep real keys only.
    clean: list[str | int] = []
    node: Any = doc.data
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict or in_list:
            clean.append(part)
            node = node[part]
        elif first["type"] == "extra_forbidden" and part == loc[-1]:
            clean.append(part)
        else:
            break
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = f"missing required key '{loc[-1]}'"
    elif first["type"] == "literal_error":
        msg = f"{msg}, got {first.get('input')!r}"
    return SpecError(doc.path, doc.line_of(clean), dotted(clean) or None, msg)


def load_presets(path: Path) -> dict[str, Preset]:
    doc = load_yaml(path)
    try:
        model = PresetFile.model_validate(doc.data)
    except ValidationError as err:
        raise pydantic_error(doc, err) from None
    out = {}
    for key, p in model.presets.items():
        if not NAME_RE.match(key):
            raise SpecError(path, doc.line_of(("presets", key)), f"presets.{key}",
                            "preset names are lower-case letters, digits, '.' and '-'")
        if p.hq % p.hkv:
            raise SpecError(path, doc.line_of(("presets", key)), f"presets.{key}",
                            f"hq={p.hq} is not divisible by hkv={p.hkv}")
        out[key] = Preset(key, p.hq, p.hkv, p.d, p.name)
    return out


def load_spec(path: str | Path, memory_cap_bytes: int = DEFAULT_MEMORY_CAP_BYTES) -> OpSpec:
    """Validate ``path`` and expand every case. Raises :class:`SpecError` on the first problem."""
    path = Path(path)
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise SpecError(path, 1, None, "a spec file must be a mapping with keys schema_version, op, seed, "
                        "presets, families")
    try:
        model = OpSpecFile.model_validate(doc.data)
    except ValidationError as err:
        raise pydantic_error(doc, err) from None
    presets_path = (path.parent / model.presets).resolve()
    presets = load_presets(presets_path)
    spec = OpSpec(path=path, op=model.op, seed=model.seed, sha256=hashlib.sha256(doc.text.encode()).hexdigest())
    by_id: dict[str, tuple[Case, Loc]] = {}
    for fam_name, fam in model.families.items():
        fam_loc: Loc = ("families", fam_name)
        if not NAME_RE.match(fam_name):
            raise SpecError(path, doc.line_of(fam_loc), f"families.{fam_name}",
                            "family names are lower-case letters, digits, '.' and '-'")
        for tier in TIERS:
            for gi, grid in enumerate(fam.tiers.get(tier, [])):
                grid_loc: Loc = (*fam_loc, "tiers", tier, gi)
                for params, locs in _expand(doc, fam.base, (*fam_loc, "base"), grid, grid_loc):
                    case = _make_case(doc, model, presets, fam_name, tier, params, locs, grid_loc,
                                      memory_cap_bytes)
                    if case.id in by_id:
                        prev, prev_loc = by_id[case.id]
                        if prev.split_points != case.split_points:
                            raise SpecError(path, doc.line_of(grid_loc), dotted(grid_loc),
                                            f"case {case.id} is declared again with other split_offsets "
                                            f"(first at line {doc.line_of(prev_loc)})")
                        continue  # same case declared by an overlapping grid or a higher tier
                    by_id[case.id] = (case, grid_loc)
    if not by_id:
        raise SpecError(path, doc.line_of(("families",)), "families", "the spec declares no cases")
    spec.cases = sorted((c for c, _ in by_id.values()), key=lambda c: c.id)
    layouts: dict[str, LayoutCase] = {}
    for name, fam in model.families.items():
        for lc in _layout_cases(doc, model, name, fam, spec.cases):
            layouts.setdefault(lc.id, lc)  # a pack declared again by a higher tier keeps its first tier
    spec.layouts = sorted(layouts.values(), key=lambda c: c.id)
    return spec


def _layout_cases(doc: YamlDocument, model: OpSpecFile, family: str, fam: FamilySpec,
                  cases: list[Case]) -> Iterable[LayoutCase]:
    """The layout cases a family declares (conformance.spec.layouts): for every tier, every entry of
    ``layouts``, every group of the family's cases without a key_padding_mask, soft-capping or sinks
    (which do not compose with the layouts) that share model, dtype, causal flag, scale, distribution
    and window, and every pack (and page size). Each pack token must name a ``(sq, skv)`` the group has
    in that tier (cumulative); a SpecError names the token otherwise."""
    for tier in TIERS:
        entries = fam.layouts.get(tier, [])
        level = TIERS.index(tier)
        eligible = [c for c in cases if c.family == family and TIERS.index(c.tier) <= level and c.mask == "none"
                    and c.softcap is None and c.sinks is None]
        groups: dict[tuple[object, ...], dict[tuple[int, int], Case]] = {}
        for c in eligible:
            members = groups.setdefault(layout_group(c), {})
            prev = members.get((c.sq, c.skv))
            if prev is None or (c.batch, c.id) > (prev.batch, prev.id):  # the largest batch: most distinct sequences
                members[(c.sq, c.skv)] = c
        for ei, entry in enumerate(entries):
            loc: Loc = ("families", family, "layouts", tier, ei)

            def fail(where: Loc, reason: str) -> SpecError:
                return SpecError(doc.path, doc.line_of(where), dotted(where), reason)

            if not groups:
                raise fail(loc, f"family {family} declares no case without a key_padding_mask, soft-capping or "
                                f"sinks in tier {tier} for its layouts to pack")
            op = LAYOUT_NAMES[entry.layout]
            sizes = tuple(entry.page_sizes or ())
            if entry.layout == "paged" and not sizes:
                raise fail(loc, "a paged layout needs page_sizes (e.g. [16, 1, 5])")
            if entry.layout == "varlen" and entry.page_sizes is not None:
                raise fail((*loc, "page_sizes"), "page_sizes belong to a paged layout")
            for si, size in enumerate(sizes):
                if not 1 <= size <= 1 << 16:
                    raise fail((*loc, "page_sizes", si), f"page size {size} must lie in [1, 65536]")
            if len(set(sizes)) != len(sizes):
                raise fail((*loc, "page_sizes"), f"page sizes {list(sizes)} repeat a value")
            for pi, pack in enumerate(entry.packs):
                pack_loc: Loc = (*loc, "packs", pi)
                if not pack:
                    raise fail(pack_loc, "a pack lists at least one token")
                try:
                    tokens = tuple(parse_token(t) for t in pack)
                except ValueError as exc:
                    raise fail(pack_loc, str(exc)) from None
                if sum(t.count for t in tokens) > MAX_PACK_SEQUENCES:
                    raise fail(pack_loc, f"a pack holds at most {MAX_PACK_SEQUENCES} sequences")
                for members in groups.values():
                    for ti, t in enumerate(tokens):
                        if (t.sq, t.skv) not in members:
                            model_, dtype, causal, _, _, window = layout_group(next(iter(members.values())))
                            windowed = "" if window == (-1, -1) else f" window {window}"
                            raise fail((*pack_loc, ti), f"pack token {t.text}: family {family} has no case with "
                                       f"Sq={t.sq} and Skv={t.skv} for {model_} {dtype} "
                                       f"{'causal' if causal else 'non-causal'}{windowed} in tier {tier} (without "
                                       "a mask, soft-capping or sinks); add one to a grid of the family")
                    for size in sizes or (None,):
                        draft = compose(op, family, tier, tokens, members, 0, size, sizes)
                        seed = int.from_bytes(hashlib.sha256(f"{model.seed}:{draft.id}".encode()).digest()[:8],
                                              "little") >> 1
                        yield compose(op, family, tier, tokens, members, seed, size, sizes)


def _expand(doc: YamlDocument, base: dict[str, Any], base_loc: Loc, grid: dict[str, Any],
            grid_loc: Loc) -> Iterable[tuple[dict[str, Any], dict[str, Loc]]]:
    """Cartesian product of a family's ``base`` and one grid; yields params and each value's location."""
    if not isinstance(grid, dict):
        raise SpecError(doc.path, doc.line_of(grid_loc), dotted(grid_loc), "a grid must be a mapping")
    merged: dict[str, tuple[Any, Loc]] = {k: (v, (*base_loc, k)) for k, v in base.items()}
    merged.update({k: (v, (*grid_loc, k)) for k, v in grid.items()})
    keys = sorted(merged)
    axes: list[list[tuple[Any, Loc]]] = []
    for key in keys:
        value, loc = merged[key]
        if key not in CaseParams.model_fields:
            raise SpecError(doc.path, doc.line_of(loc), dotted(loc), "unknown key")
        if isinstance(value, list) and key not in LIST_VALUED and not _sink_values(key, value):
            if not value:
                raise SpecError(doc.path, doc.line_of(loc), dotted(loc), "an axis must list at least one value")
            axes.append([(v, (*loc, i)) for i, v in enumerate(value)])
        else:
            axes.append([(value, loc)])
    size = math.prod(len(axis) for axis in axes)
    if size > MAX_GRID_CASES:
        raise SpecError(doc.path, doc.line_of(grid_loc), dotted(grid_loc),
                        f"this grid expands to {size} cases; a grid may declare at most {MAX_GRID_CASES}")
    for combo in itertools.product(*axes):
        yield ({k: v for k, (v, _) in zip(keys, combo)}, {k: loc for k, (_, loc) in zip(keys, combo)})


def _sink_values(key: str, value: list[Any]) -> bool:
    """``sinks: [0.5, -1.0, ...]`` is one value (the logits of the query heads), not an axis; an axis of
    sinks lists booleans or lists."""
    return key == "sinks" and bool(value) and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                  for x in value)


def _make_case(doc: YamlDocument, model: OpSpecFile, presets: dict[str, Preset], family: str, tier: str,
               raw: dict[str, Any], locs: dict[str, Loc], grid_loc: Loc, memory_cap_bytes: int) -> Case:
    path = doc.path

    def fail(key: str | None, reason: str) -> SpecError:
        loc = locs.get(key, grid_loc) if key else grid_loc
        return SpecError(path, doc.line_of(loc), dotted(loc), reason)

    try:
        p = CaseParams.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "missing":
            raise fail(None, f"missing required key '{key}' (set it in the grid or the family's base)") from None
        msg = f"{first['msg']}, got {first.get('input')!r}" if first["type"] == "literal_error" else first["msg"]
        raise fail(key, msg) from None
    if p.preset is not None:
        if p.preset not in presets:
            raise fail("preset", f"unknown preset {p.preset!r} (known: {', '.join(sorted(presets))})")
        for k in ("hq", "hkv", "d"):
            if getattr(p, k) is not None:
                raise fail(k, f"set either preset or {k}, not both")
        pr = presets[p.preset]
        hq, hkv, d = pr.hq, pr.hkv, pr.d
    else:
        for k in ("hq", "hkv", "d"):
            if getattr(p, k) is None:
                raise fail(None, f"missing required key '{k}' (or name a preset)")
        hq, hkv, d = p.hq, p.hkv, p.d  # type: ignore[assignment]
    if hq % hkv:
        raise fail("hkv" if "hkv" in locs else "preset", f"hq={hq} is not divisible by hkv={hkv}")

    split_points: tuple[int, ...] = ()
    s_past = None
    if model.op == "attention":
        for k in ("s_past", "s_new", "split_offsets"):
            if getattr(p, k) is not None:
                raise fail(k, f"'{k}' belongs to the kv_cache_attention op")
        if p.sq is None or p.skv is None:
            raise fail(None, f"missing required key '{'sq' if p.sq is None else 'skv'}'")
        sq, skv = p.sq, p.skv
    else:
        if p.skv is not None:
            raise fail("skv", "the kv_cache_attention op takes s_past and s_new, not skv")
        if p.s_past is None or p.s_new is None:
            raise fail(None, f"missing required key '{'s_past' if p.s_past is None else 's_new'}'")
        if p.sq is not None and p.sq != p.s_new:
            raise fail("sq", f"sq={p.sq} must equal s_new={p.s_new} for the kv_cache_attention op")
        s_past, sq, skv = p.s_past, p.s_new, p.s_past + p.s_new
        offsets = p.split_offsets or [0]
        for off in offsets:
            if not 0 <= off < p.s_new:
                raise fail("split_offsets", f"split offset {off} must lie in [0, s_new={p.s_new})")
        split_points = tuple(sorted({s_past + off for off in offsets} | {s_past}))
    scale = None if p.scale == "default" else float(p.scale)
    if scale is not None and not math.isfinite(scale):
        raise fail("scale", f"scale must be finite, got {scale}")
    softcap = p.softcap
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise fail("softcap", f"softcap must be a finite number > 0 (leave it out for no soft-capping), got {softcap}")
    window = (p.window_left, p.window_right)
    sinks: tuple[float, ...] | None = None
    drawn = p.sinks is True
    if isinstance(p.sinks, list):
        if len(p.sinks) != hq:
            raise fail("sinks", f"sinks lists {len(p.sinks)} logits; the case has Hq={hq} query heads (one each)")
        if not all(math.isfinite(x) for x in p.sinks):
            raise fail("sinks", "every sink logit must be finite")
        sinks = tuple(float(x) for x in np.asarray(p.sinks, dtype=np.float32))

    cid = case_id(model.op, family, model=p.preset or f"hq{hq}-hkv{hkv}-d{d}", batch=p.batch, sq=sq, skv=skv,
                  s_past=s_past, dtype=p.dtype, causal=p.causal, mask=p.mask, dist=p.dist, scale=scale, grad=p.grad,
                  window=window, softcap=softcap, sinks=() if drawn else sinks, sinks_drawn=drawn)
    seed = int.from_bytes(hashlib.sha256(f"{model.seed}:{cid}".encode()).digest()[:8], "little") >> 1
    if drawn:
        sinks = drawn_sinks(seed, hq)
    case = Case(id=cid, op=model.op, family=family, tier=tier, batch=p.batch, hq=hq, hkv=hkv, d=d, sq=sq,
                skv=skv, dtype=p.dtype, causal=p.causal, scale=scale, mask=p.mask, dist=p.dist, seed=seed,
                preset=p.preset, s_past=s_past, split_points=split_points, grad=p.grad, window=window,
                softcap=softcap, sinks=sinks)
    need = case.working_bytes
    if need > memory_cap_bytes:
        raise fail(None, f"case {cid} needs {need / 2**20:.0f} MiB, over the memory cap of "
                   f"{memory_cap_bytes / 2**20:.0f} MiB (raise it with --memory-cap-mib)")
    return case


def load_specs(paths: Sequence[str | Path], memory_cap_bytes: int = DEFAULT_MEMORY_CAP_BYTES) -> list[OpSpec]:
    specs = [load_spec(p, memory_cap_bytes) for p in paths]
    seen: dict[str, Path] = {}
    for spec in specs:
        if spec.op in seen:
            raise SpecError(spec.path, 1, "op", f"op {spec.op} is already declared by {seen[spec.op]}")
        seen[spec.op] = spec.path
    return specs


def default_spec_paths(spec_dir: Path | None = None) -> list[Path]:
    """``attention.yaml`` and ``kv_cache_attention.yaml`` of ``spec_dir``, by default the shipped specs
    (:func:`conformance.locations.spec_dir`)."""
    directory = spec_dir if spec_dir is not None else locations.spec_dir()
    return [directory / f"{op}.yaml" for op in OPS]
