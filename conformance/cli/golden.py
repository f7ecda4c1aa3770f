"""The ``generate``, ``merge-goldens``, ``verify``, ``specs`` and ``release`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from conformance.cli.app import (
    CapOpt,
    SpecOpt,
    Tier,
    app,
    fmt_bytes,
    load_spec_option,
    out,
    user_errors,
)
from conformance.cli.progress import progress_bar
from conformance.errors import EXIT_FAILURE, ConformanceError, UsageError
from conformance.locations import find_goldens, output_root
from conformance.spec.case import TIERS
from conformance.spec.load import DEFAULT_MEMORY_CAP_BYTES


def unlisted_goldens(root: Path) -> list[Path]:
    """Golden files (``*.h5``, layout ``*.json``) under ``root`` that its manifest does not list
    (the manifest and shard manifests aside)."""
    from conformance.golden.manifest import MANIFEST_NAME, is_shard_manifest_name, read_manifest

    listed = {root / e["path"] for e in read_manifest(root)["files"]}
    return sorted(p for p in root.rglob("*") if p.suffix in (".h5", ".json") and p.name != MANIFEST_NAME
                  and not (p.parent == root and is_shard_manifest_name(p.name)) and p.is_file() and p not in listed)


@app.command()
@user_errors
def generate(
    spec: SpecOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output directory. Default: <tier>/ of $RLK_GOLDENS, "
                                                 "else of the source checkout's goldens/, else of ./goldens.")
                       ] = None,
    tier: Annotated[Tier, typer.Option(help="Tier to generate (tiers are cumulative).")] = Tier.smoke,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, show_default=False, help="Worker processes "
                                             "in all; with --devices spread as evenly as possible over the devices, "
                                             "at least one per device. Default: one per core, at most 8 per CUDA "
                                             "device, and no more than half the host budget holds of their own "
                                             "memory (about 1.3 GiB per CUDA worker, 0.4 GiB per CPU one).")] = None,
    device: Annotated[str | None, typer.Option(help="Where the float64 stage runs: cpu or cuda[:N] (default: cpu)."
                                               )] = None,
    devices: Annotated[str | None, typer.Option(help="Split the cases over these devices, e.g. cuda:0,cuda:1 (or "
                                                "cpu,cpu), each with its share of --jobs; the goldens and manifest "
                                                "are byte-identical to a one-device run.")] = None,
    shard: Annotated[str | None, typer.Option(help="Generate only shard i of n (0-based, e.g. 0/4: case k in "
                                              "case-id order is in shard k % n) and write "
                                              "manifest.shard-<i>-of-<n>.json instead of manifest.json; combine "
                                              "the shards with rlk-conform merge-goldens DIR.")] = None,
    memory_cap_mib: CapOpt = DEFAULT_MEMORY_CAP_BYTES // 2**20,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the complete goldens an interrupted run left "
                                         "(checked, same spec and generator) and compute only the rest.")] = False,
    host_memory_gib: Annotated[float | None, typer.Option(
        "--host-memory-gib", min=0.5, help="Host memory the workers and their cases may hold at once: a case "
        "waits while its estimate does not fit beside what the workers hold (measured from /proc where there is "
        "one) and what the running cases may still grow by; never its bytes. Default: 24, or 3/4 of a smaller "
        "machine's memory.")] = None,
    filter_: Annotated[str | None, typer.Option("--filter", help="Only the cases whose id matches this glob, "
                                                "e.g. '*-grad' (needs --out: the tier's own set stays whole).")
                       ] = None,
) -> None:
    """Generate correctly rounded fp32 golden files for every case of a tier, then the manifest."""
    from dataclasses import replace
    from fnmatch import fnmatchcase

    from conformance.golden.generate import generate as run_generate
    from conformance.jobs.devices import parse_devices
    from conformance.run.loop import parse_shard

    if devices is not None and device is not None:
        raise UsageError("--devices cannot be combined with --device: list every device in --devices")
    device_list = parse_devices(devices) if devices is not None else None
    shard_of = parse_shard(shard) if shard is not None else None
    if filter_ is not None and out_dir is None:
        raise ConformanceError("--filter needs --out DIR: a filtered set must not replace the tier's own goldens "
                               "and manifest")
    specs = load_spec_option(spec, memory_cap_mib)
    if filter_ is not None:
        specs = [replace(s, cases=[c for c in s.cases if fnmatchcase(c.id, filter_)]) for s in specs]
        if not any(s.cases_for_tier(tier.value) for s in specs):
            raise ConformanceError(f"--filter {filter_!r}: no case of tier '{tier.value}' matches")
    target = out_dir or output_root() / tier.value
    written = [0]
    with progress_bar("generate", tier.value, eta=True, extra="cases · {task.fields[written]}", written="0 B") as bar:

        def on_done(job: Any, res: Any) -> None:
            written[0] += res.bytes
            bar.advance(written=fmt_bytes(written[0]))

        summary = run_generate(specs, tier.value, target, n_workers=jobs, device=device or "cpu",
                               devices=device_list, shard=shard_of,
                               host_budget=None if host_memory_gib is None else int(host_memory_gib * 2**30),
                               on_start=lambda job_list: bar.start(len(job_list)), on_done=on_done, resume=resume)
    gflops = summary.flops / summary.seconds / 1e9 if summary.seconds else 0.0
    refined_dd = sum(r.refined_double_double for r in summary.results)
    refined_exact = sum(r.refined_exact for r in summary.results)
    table = Table(title=f"generated tier '{tier.value}' → {target}", show_header=False)
    table.add_row("cases", str(len(summary.results)) + (f" ({summary.reused} kept from the interrupted run)"
                                                        if resume else ""))
    if shard_of is not None:
        table.add_row("shard", f"{shard_of[0]}/{shard_of[1]} ({len(summary.results)} of the tier's "
                      f"{summary.tier_cases} goldens)")
    table.add_row("bytes", fmt_bytes(summary.bytes))
    workers = sum(share.workers for share in summary.devices)
    table.add_row("wall time", f"{summary.seconds:.1f} s ({workers} job{'s' if workers > 1 else ''}, "
                  f"{','.join(share.device for share in summary.devices)})")
    if device_list is not None:
        table.add_row("devices", "; ".join(f"{share.device}: {len(share.jobs)} computed, {share.workers} job"
                                           f"{'s' if share.workers > 1 else ''}" for share in summary.devices))
    if summary.host is not None:
        host = summary.host
        held = (f"{fmt_bytes(host.peak)} at most (workers and this process, sampled)" if host.measured
                else "not measured here (estimates only)")
        waited = f"; cases waited {host.waited_s:.1f} s for memory" if host.waited_s >= 0.05 else ""
        table.add_row("host memory", f"{held} of the {fmt_bytes(host.budget)} budget{waited}")
    table.add_row("float64 work", f"{summary.flops / 1e9:.2f} GFLOP (mask-remaining) at {gflops:.2f} GFLOP/s")
    table.add_row("refined elements", f"{refined_dd} double-double, {refined_exact} exact (cases computed in this run)")
    table.add_row("manifest", str(summary.manifest) + (f" (copy all {shard_of[1]} shards into one directory, "
                                                       "then: rlk-conform merge-goldens DIR)" if shard_of else ""))
    out.print(table)
    if shard_of is not None:
        return  # no manifest.json to compare with until the shards are merged
    stale = unlisted_goldens(target)
    if stale:
        shown = ", ".join(str(p.relative_to(target)) for p in stale[:3]) + (", …" if len(stale) > 3 else "")
        out.print(f"[yellow]note[/]: {len(stale)} golden file(s) in {target} are no case of these specs any more "
                  f"(left in place; verify reports them until they are removed): {shown}", soft_wrap=True)


@app.command("merge-goldens")
@user_errors
def merge_goldens(
    directory: Annotated[Path, typer.Argument(help="Directory holding the goldens and the shard manifests of "
                                              "every shard (rlk-conform generate --shard i/n), copied together.")],
) -> None:
    """Write DIR/manifest.json from the shards of a sharded generation in DIR.

    Every shard i/n must be there exactly once, all of one generation (tier, specs, generator), with
    every file its shard manifest lists unchanged; the manifest is then the one an unsharded run
    writes. Exit 2, writing nothing, when a shard is missing or repeated, the shards disagree, or a
    file is missing or changed."""
    from conformance.golden.shards import merge_shards

    merged = merge_shards(directory)
    table = Table(title=f"merged {merged.shards} shard{'s' if merged.shards > 1 else ''} of tier "
                  f"'{merged.tier}' → {directory}", show_header=False)
    table.add_row("files", str(merged.files))
    table.add_row("dataset SHA-256", merged.dataset_sha256)
    table.add_row("manifest", str(merged.manifest))
    out.print(table)


@app.command()
@user_errors
def verify(
    directory: Annotated[Path | None, typer.Argument(help="Golden directory holding manifest.json (or a release "
                                                     "bundle). Default: the default smoke goldens.")] = None,
    regenerate: Annotated[bool, typer.Option(help="Recompute every case and require identical bytes.")] = False,
    device: Annotated[str, typer.Option(help="Where regeneration's float64 stage runs.")] = "cpu",
) -> None:
    """Check a golden directory: manifest checksums, schema, per-dataset SHA-256 (and regeneration).
    A release bundle (a directory with bundle.json) is verified end to end: every file, then its goldens."""
    from conformance.golden.release import is_bundle

    directory = directory if directory is not None else find_goldens("smoke")
    if is_bundle(directory):
        return verify_bundle_command(directory, regenerate=regenerate, device=device)
    from conformance.golden.verify import verify as run_verify

    with progress_bar("verify") as bar:
        result = run_verify(directory, regenerate=regenerate, device=device, on_start=bar.start,
                            on_done=lambda case_id, ok: bar.advance(case_id))
    table = Table(title=f"verify {directory}", show_header=False)
    table.add_row("files checked", str(result.checked))
    if regenerate:
        failed = {p.path for p in result.problems}
        table.add_row("regenerated", f"{result.regenerated} ({result.regenerated - len(failed)} bit-identical)")
    table.add_row("dataset SHA-256", str(result.manifest.get("dataset_sha256")))
    print_verification(table, result.problems)
    out.print(f"OK: {result.checked} golden files verified" + (", every one regenerated bit-identical"
                                                                if regenerate else ""))


def print_verification(table: Table, problems: list[Any]) -> None:
    """The summary table of a verification, then each problem on its own ``FAIL`` line; exit 1 if
    there were any (the caller prints its ``OK`` line otherwise)."""
    table.add_row("problems", str(len(problems)))
    out.print(table)
    for p in problems:
        out.print(f"FAIL {p}", markup=False, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(EXIT_FAILURE)


@app.command("specs")
@user_errors
def list_specs(
    spec: SpecOpt = None,
    tier: Annotated[Tier, typer.Option(help="List the cases of this tier.")] = Tier.smoke,
    ids_only: Annotated[bool, typer.Option("--ids", help="Print case ids only, one per line.")] = False,
    memory_cap_mib: CapOpt = DEFAULT_MEMORY_CAP_BYTES // 2**20,
) -> None:
    """Validate the specs and list the cases of a tier."""
    specs = load_spec_option(spec, memory_cap_mib)
    cases = [c for s in specs for c in s.cases_for_tier(tier.value)]
    layouts = [c for s in specs for c in s.layouts_for_tier(tier.value)]
    if ids_only:
        for c in [*cases, *layouts]:
            out.print(c.id, markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=f"{len(cases)} cases in tier '{tier.value}'")
    for col in ("case id", "B", "Hq/Hkv", "D", "Sq", "Skv", "dtype", "tier"):
        table.add_column(col, overflow="fold")
    for c in cases:
        table.add_row(c.id, str(c.batch), f"{c.hq}/{c.hkv}", str(c.d), str(c.sq), str(c.skv), c.dtype, c.tier)
    out.print(table)
    total = sum(c.tensor_bytes for c in cases)
    out.print(f"{len(cases)} cases, {fmt_bytes(total)} of tensors; tiers are cumulative ({' ⊂ '.join(TIERS)})")
    if layouts:
        packed = Table(title=f"{len(layouts)} packed and paged cases in tier '{tier.value}' (views of the cases above)")
        for col in ("case id", "sequences", "Hq/Hkv", "D", "page", "dtype", "tier"):
            packed.add_column(col, overflow="fold")
        for lc in layouts:
            packed.add_row(lc.id, str(lc.batch), f"{lc.hq}/{lc.hkv}", str(lc.d), str(lc.page_size or "-"), lc.dtype,
                           lc.tier)
        out.print(packed)

@app.command("release")
@user_errors
def release_cmd(
    tier: Annotated[Tier, typer.Option(help="Tier to release.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to create (new or empty).")],
    goldens: Annotated[Path | None, typer.Option(help="Golden directory of that tier. Default: the default "
                                                 "goldens of the tier.")] = None,
    specs: Annotated[Path | None, typer.Option(help="Spec directory the goldens were generated from (its *.yaml "
                                               "ship in the bundle). Default: the shipped specs.")] = None,
) -> None:
    """Write a vendor bundle: goldens, manifest, specs and tolerances, format docs, must-pass lists,
    a vendor README and one checksum of the whole bundle. Check it with: rlk-conform verify OUT."""
    from conformance.golden.release import build_release

    summary = build_release(tier.value, out_dir, goldens, spec_dir=specs)
    table = Table(title=f"release '{tier.value}' → {out_dir}", show_header=False)
    table.add_row("cases", str(summary.cases))
    table.add_row("files", f"{summary.files} ({summary.bytes / 2**20:.1f} MiB)")
    table.add_row("must-pass lists", ", ".join(f"{k} ({n})" for k, n in summary.mustpass.items()))
    table.add_row("dataset SHA-256", summary.dataset_sha256)
    table.add_row("bundle SHA-256", summary.bundle_sha256)
    out.print(table)
    out.print(f"verify with: rlk-conform verify {out_dir}", markup=False, highlight=False)


def verify_bundle_command(directory: Path, regenerate: bool, device: str) -> None:
    """``rlk-conform verify DIR`` when DIR is a bundle: print the outcome; exit 1 on any problem."""
    from conformance.golden.release import verify_bundle

    with progress_bar("verify goldens") as bar:
        result = verify_bundle(directory, regenerate=regenerate, device=device, on_start=bar.start,
                               on_done=lambda case_id, ok: bar.advance(case_id))
    table = Table(title=f"verify bundle {directory}", show_header=False)
    table.add_row("bundle files checked", str(result.files_checked))
    table.add_row("bundle SHA-256", str(result.bundle.get("bundle_sha256")))
    table.add_row("golden files checked", str(result.goldens.checked if result.goldens else 0))
    if regenerate and result.goldens:
        table.add_row("regenerated", str(result.goldens.regenerated))
    print_verification(table, result.problems)
    out.print(f"OK: bundle verified: {result.files_checked} files, bundle SHA-256 {result.bundle['bundle_sha256']}, "
              f"{result.goldens.checked if result.goldens else 0} golden files", markup=False, highlight=False)
