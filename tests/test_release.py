"""rlk-conform release: a vendor bundle from a golden tier verifies end to end, any tampering is
caught and named, and a backend from outside the repository follows the bundle's README to a
complete result file."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOKE_GOLDENS, SPEC_DIR
from typer.testing import CliRunner, Result

from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from conformance.golden.manifest import read_manifest
from conformance.golden.release import (
    BUNDLE_JSON,
    BUNDLE_SHA256,
    CHECKSUM_COMMAND,
    RUN_COMMAND,
    build_release,
    missing_result_fields,
    must_pass_checks,
)

VENDOR_BACKEND = '''
"""A vendor's kernel, outside the rlk-conform repository: torch SDPA (math kernel) in float32."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class VendorAttention:
    name = "vendor-sdpa-math-fp32"
    device = "cpu"

    def attention(self, q, k, v, *, causal, scale, key_padding_mask):
        sq, skv = q.shape[2], k.shape[2]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        i = torch.arange(sq)[:, None]
        j = torch.arange(skv)[None, :]
        see = (j <= i + (skv - sq)) if causal else torch.ones(sq, skv, dtype=torch.bool)
        see = see[None, None]
        if key_padding_mask is not None:
            see = see & key_padding_mask[:, None, None, :]
        with sdpa_kernel(SDPBackend.MATH):
            out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=see,
                                                                   scale=scale)
        return torch.where(see.any(-1, keepdim=True), out, 0.0).to(q.dtype)

    def kv_cache_attention(self, q, k_cache, v_cache, k_new, v_new, *, causal, scale, key_padding_mask):
        return self.attention(q, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2), causal=causal,
                              scale=scale, key_padding_mask=key_padding_mask)
'''


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the committed smoke tier (built once; tampering tests work on copies)."""
    out = tmp_path_factory.mktemp("release") / "bundle"
    build_release("smoke", out, SMOKE_GOLDENS, spec_dir=SPEC_DIR)
    return out


@pytest.fixture
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_bundle_from_the_smoke_tier_verifies(bundle: Path) -> None:
    result = invoke("verify", bundle)
    assert result.exit_code == EXIT_OK, result.output
    assert "OK: bundle verified" in result.stdout


def test_bundle_holds_goldens_specs_docs_mustpass_and_readme(bundle: Path) -> None:
    manifest = read_manifest(bundle / "goldens")
    assert manifest == read_manifest(SMOKE_GOLDENS)
    for rel in ("README.md", "docs/golden-format.md", "specs/tolerances.yaml", "specs/attention.yaml",
                "specs/kv_cache_attention.yaml", "specs/presets.yaml", "mustpass/attention-bfloat16.txt"):
        assert (bundle / rel).is_file(), rel
    for e in manifest["files"]:
        assert (bundle / "goldens" / e["path"]).read_bytes() == (SMOKE_GOLDENS / e["path"]).read_bytes()
    listed: list[str] = []
    for path in sorted((bundle / "mustpass").glob("*.txt")):
        op, dtype = path.stem.split("-")
        ids = path.read_text().split()
        short = {"float32": "-fp32-", "bfloat16": "-bf16-", "float16": "-fp16-"}[dtype]
        assert all(cid.startswith(f"{op}/") and short in cid for cid in ids), path.name
        listed += ids
    assert sorted(listed) == sorted(e["case_id"] for e in manifest["files"])


def test_bundle_checksum_is_reproduced_by_coreutils(bundle: Path) -> None:
    if not (shutil.which("sha256sum") and shutil.which("find") and shutil.which("xargs")):
        pytest.skip("coreutils/findutils not on PATH")
    printed = subprocess.run(CHECKSUM_COMMAND, shell=True, cwd=bundle, capture_output=True, text=True,
                             check=True).stdout.split()[0]
    recorded = (bundle / BUNDLE_SHA256).read_text().strip()
    assert printed == recorded == json.loads((bundle / BUNDLE_JSON).read_text())["bundle_sha256"]
    assert CHECKSUM_COMMAND in (bundle / "README.md").read_text()


def test_the_same_goldens_give_the_same_bundle_checksum(bundle: Path, tmp_path: Path) -> None:
    again = build_release("smoke", tmp_path / "again", SMOKE_GOLDENS, spec_dir=SPEC_DIR)
    assert again.bundle_sha256 == (bundle / BUNDLE_SHA256).read_text().strip()


def _flip_byte_in_a_golden(root: Path) -> str:
    rel = "goldens/" + read_manifest(root / "goldens")["files"][0]["path"]
    data = bytearray((root / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / rel).write_bytes(bytes(data))
    return rel


def _edit_readme(root: Path) -> str:
    with open(root / "README.md", "a") as f:
        f.write("\nAll checks are optional.\n")
    return "README.md"


def _delete_a_mustpass_list(root: Path) -> str:
    (root / "mustpass/attention-float16.txt").unlink()
    return "mustpass/attention-float16.txt"


def _add_a_stray_file(root: Path) -> str:
    (root / "specs/extra_tolerances.yaml").write_text("accuracy: {}\n")
    return "specs/extra_tolerances.yaml"


def _rewrite_bundle_sha256(root: Path) -> str:
    (root / BUNDLE_SHA256).write_text("0" * 64 + "\n")
    return BUNDLE_SHA256


@pytest.mark.parametrize("tamper", [_flip_byte_in_a_golden, _edit_readme, _delete_a_mustpass_list, _add_a_stray_file,
                                    _rewrite_bundle_sha256],
                         ids=["flip-golden-byte", "edit-readme", "delete-mustpass", "add-stray-file",
                              "rewrite-checksum"])
def test_a_tampered_bundle_fails_verification_naming_the_file(bundle_copy: Path, tamper) -> None:
    rel = tamper(bundle_copy)
    result = invoke("verify", bundle_copy)
    assert result.exit_code == EXIT_FAILURE, result.output
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL ")]
    assert any(str(bundle_copy / rel) in line for line in fails), result.stdout


def test_release_without_goldens_is_a_one_line_error(tmp_path: Path) -> None:
    result = invoke("release", "--tier", "standard", "--out", tmp_path / "b", "--goldens", tmp_path / "none",
                    "--specs", SPEC_DIR)
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.count("\n") == 1 and "generate it first: rlk-conform generate --tier standard" in result.stderr
    assert not (tmp_path / "b").exists()


def test_release_refuses_goldens_of_another_tier(tmp_path: Path) -> None:
    result = invoke("release", "--tier", "standard", "--out", tmp_path / "b", "--goldens", SMOKE_GOLDENS,
                    "--specs", SPEC_DIR)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "holds tier 'smoke', not 'standard'" in result.stderr


def test_release_refuses_a_non_empty_output_directory(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    result = invoke("release", "--tier", "smoke", "--out", tmp_path / "b", "--goldens", SMOKE_GOLDENS,
                    "--specs", SPEC_DIR)
    assert result.exit_code == EXIT_BAD_INPUT and "not an empty directory" in result.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["keep.txt"]


def test_release_refuses_specs_changed_since_generation(tmp_path: Path) -> None:
    specs = Path(shutil.copytree(SPEC_DIR, tmp_path / "specs"))
    with open(specs / "attention.yaml", "a") as f:
        f.write("# edited after generation\n")
    result = invoke("release", "--tier", "smoke", "--out", tmp_path / "b", "--goldens", SMOKE_GOLDENS,
                    "--specs", specs)
    assert result.exit_code == EXIT_BAD_INPUT and "attention.yaml: changed since" in result.stderr


def test_readme_names_the_must_pass_checks_and_result_fields(bundle: Path) -> None:
    readme = (bundle / "README.md").read_text()
    assert RUN_COMMAND in readme
    for check in must_pass_checks():
        assert f"`{check}`" in readme
    for field in ("backend.requested", "execution_target.device_name", "goldens.dataset_sha256", "summary.verdict"):
        assert f"`{field}`" in readme
    assert "docs/golden-format.md" in readme and "H5Dread" in readme and "h5py.File" in readme


def test_a_backend_outside_the_repository_follows_the_readme_to_a_complete_result(bundle: Path,
                                                                                   tmp_path: Path) -> None:
    (tmp_path / "vendor_kernel.py").write_text(VENDOR_BACKEND)
    readme = (bundle / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("rlk-conform run --backend MODULE:CLASS"))
    command = command.replace("MODULE:CLASS", "vendor_kernel:VendorAttention").replace(
        "BUNDLE", shlex.quote(str(bundle)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the module is importable via cwd only
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (EXIT_OK, EXIT_FAILURE), proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert missing_result_fields(result) == []
    assert result["backend"]["used"] == "vendor-sdpa-math-fp32"
    assert result["goldens"]["dataset_sha256"] == json.loads((bundle / BUNDLE_JSON).read_text())["goldens"][
        "dataset_sha256"]
    assert result["summary"]["executed"] > 0 and result["summary"]["by_check"]["accuracy"]["fail"] == 0


def test_missing_result_fields_names_what_is_absent() -> None:
    assert "summary.verdict" in missing_result_fields({"summary": {}})
    assert "records[0].status" in missing_result_fields({"records": [{"case_id": "x"}]})
