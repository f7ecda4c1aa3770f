"""Bad specs: every mutation of the committed spec files is either a valid spec or one clear error.

A Hypothesis fuzz test mutates specs/attention.yaml, kv_cache_attention.yaml, presets.yaml and
tolerances.yaml (wrong types, unknown, missing and duplicate keys, huge or negative numbers,
malformed YAML, non-UTF-8 bytes, anchors and aliases, Python tags, truncation) and requires: the
library raises SpecError naming the file and the line (never another exception), and the CLI exits
2 with one line on stderr, no traceback, and writes nothing. Hand-written payloads cover what a
random mutation rarely reaches (alias bombs, deep nesting, a FIFO or /dev/zero as a spec).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conformance.cli.app import app
from conformance.errors import EXIT_BAD_INPUT, SpecError
from conformance.spec.load import default_spec_paths, load_specs
from conformance.spec.tolerances import load_tolerances

REPO = Path(__file__).resolve().parents[2]
SPEC_FILES = ("attention.yaml", "kv_cache_attention.yaml", "presets.yaml", "tolerances.yaml")
COMMITTED = {name: (REPO / "specs" / name).read_bytes() for name in SPEC_FILES}
FUZZ_EXAMPLES = 50  # the CI lane; the slow twins below (nox -s slow) draw ten times as many
SLOW_FUZZ_EXAMPLES = 500

# Values a careless or hostile editor might put anywhere.
NASTY_VALUES = [
    "-1", "0", "-0.0", "1e400", "-1e400", ".nan", ".inf", "99999999999999999999999999999", "1" * 5000,
    "0x7fffffffffffffffffff", "'64'", '"bfloat16 "', "null", "~", "[]", "{}", "[1, [2, [3]]]", "true", "yes",
    "2026-13-45", "2026-11-26", "!!binary aGVsbG8=", "!!binary '%%%'", "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system", "!!set {a, b}", "&anchor 5", "*undefined_alias", "'unterminated", "{a: 1",
    "[1, 2", "@reserved", "`backtick", "%TAG", "x" * 300, "\t", "- item", "? complex", "|\n  block",
    "!!float 1", "!!str 64", "!!int '3'", "!!omap [a: 1]",
]
SPECIAL_DOCUMENTS = [
    # billion laughs: nine levels of ten aliases
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(9)),
    "root: &r [*r]\n",  # an alias inside its own anchor
    "x: " + "[" * 20000 + "]" * 20000 + "\n",  # nesting deeper than Python's recursion limit
    "x: " + "{a: " * 100 + "1" + "}" * 100 + "\n",
    "schema_version: 1\n---\nschema_version: 1\n",  # two documents
    "<<: {op: attention}\n",  # a merge key
    "",  # empty file
    "# only a comment\n",
    "\ufeffschema_version: 1\n",  # BOM
    "- just\n- a\n- list\n",
    "just a string\n",
    "? [complex, key]\n: value\n",
]


@dataclass(frozen=True)
class Outcome:
    """What loading a (mutated) spec set gave: None for a valid spec, else the error."""

    error: SpecError | None


def load_all(spec_dir: Path, target: str) -> Outcome:
    """Load what a mutation of ``target`` affects; SpecError is the only acceptable exception."""
    try:
        if target == "tolerances.yaml":
            load_tolerances(spec_dir / target)
        else:
            load_specs(default_spec_paths(spec_dir))
    except SpecError as exc:
        return Outcome(exc)
    return Outcome(None)


def assert_clear_error(err: SpecError, spec_dir: Path) -> None:
    text = str(err)
    assert "\n" not in text, f"error message spans lines: {text!r}"
    assert Path(err.file).parent == spec_dir, f"error names {err.file}, not a spec of {spec_dir}"
    assert text.startswith(err.file)
    file_level = ("file not found", "not a regular file", "file is larger than")
    if not err.reason.startswith(file_level):
        assert err.line is not None and err.line >= 1, f"no line in {text!r}"


def assert_cli_exits_two_and_writes_nothing(spec_dir: Path, target: str, err: SpecError) -> None:
    out = spec_dir.parent / "out"
    if target == "tolerances.yaml":
        report = spec_dir.parent / "report.json"
        args = ["run", "--tolerances", str(spec_dir / target), "--goldens", str(REPO / "goldens" / "smoke"),
                "--report-json", str(report)]
        written = [report]
    else:
        args = ["generate", "--out", str(out), *[a for p in default_spec_paths(spec_dir) for a in ("--spec", str(p))]]
        written = [out]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_BAD_INPUT, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {err}", result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not any(p.exists() for p in written), "a rejected spec must not leave any output behind"


def check_mutation(target: str, mutated: bytes) -> Outcome:
    """Load ``mutated`` in place of ``target`` beside the other committed specs; an error must be
    clear in the library and in the CLI."""
    with tempfile.TemporaryDirectory(prefix="rlk-badspec-") as tmp:
        spec_dir = Path(tmp) / "specs"
        spec_dir.mkdir()
        for name, data in COMMITTED.items():
            (spec_dir / name).write_bytes(mutated if name == target else data)
        outcome = load_all(spec_dir, target)
        if outcome.error is not None:
            assert_clear_error(outcome.error, spec_dir)
            assert_cli_exits_two_and_writes_nothing(spec_dir, target, outcome.error)
    return outcome


def label(outcome: Outcome) -> str:
    """A Hypothesis event (``--hypothesis-show-statistics`` tallies them): valid, or the kind of error."""
    return "valid spec" if outcome.error is None else "SpecError: " + outcome.error.reason.split(":")[0][:40]


# --- mutations -------------------------------------------------------------------------------------

VALUE_RE = re.compile(rb"(?P<key>[A-Za-z_][\w.-]*): (?P<value>[^,{}\[\]\n#]+)")
KEY_RE = re.compile(rb"(?P<key>[A-Za-z_][\w.-]*):")


def _nth(matches: list[re.Match[bytes]], i: int) -> re.Match[bytes] | None:
    return matches[i % len(matches)] if matches else None


def replace_value(data: bytes, i: int, value: str) -> bytes:
    m = _nth(list(VALUE_RE.finditer(data)), i)
    return data if m is None else data[: m.start("value")] + value.encode() + data[m.end("value"):]


def rename_key(data: bytes, i: int, name: str) -> bytes:
    m = _nth(list(KEY_RE.finditer(data)), i)
    return data if m is None else data[: m.start("key")] + name.encode() + data[m.end("key"):]


def drop_key(data: bytes, i: int, _: str) -> bytes:
    m = _nth(list(VALUE_RE.finditer(data)), i)
    return data if m is None else data[: m.start()] + data[m.end():]


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def delete_line(data: bytes, i: int, _: str) -> bytes:
    lines = _lines(data)
    if not lines:
        return data
    del lines[i % len(lines)]
    return b"".join(lines)


def duplicate_line(data: bytes, i: int, _: str) -> bytes:
    lines = _lines(data)
    if not lines:
        return data
    k = i % len(lines)
    return b"".join([*lines[: k + 1], lines[k], *lines[k + 1:]])


def reindent_line(data: bytes, i: int, text: str) -> bytes:
    lines = _lines(data)
    if not lines:
        return data
    k = i % len(lines)
    lines[k] = b" " * (len(text) % 7) + lines[k].lstrip(b" ")
    return b"".join(lines)


def truncate(data: bytes, i: int, _: str) -> bytes:
    return data[: i % (len(data) + 1)]


def insert_bytes(data: bytes, i: int, text: str) -> bytes:
    k = i % (len(data) + 1)
    junk = text.encode("utf-8", "surrogatepass")[:16] or b"\xff"
    return data[:k] + junk + data[k:]


def insert_raw(data: bytes, i: int, text: str) -> bytes:
    k = i % (len(data) + 1)
    raw = bytes((ord(c) * 37 + 0x80) % 256 for c in text[:8]) or b"\x80"
    return data[:k] + raw + data[k:]


def append_document(data: bytes, i: int, _: str) -> bytes:
    return data + b"\n" + SPECIAL_DOCUMENTS[i % len(SPECIAL_DOCUMENTS)].encode()


def replace_document(data: bytes, i: int, _: str) -> bytes:
    return SPECIAL_DOCUMENTS[i % len(SPECIAL_DOCUMENTS)].encode()


MUTATIONS: dict[str, Callable[[bytes, int, str], bytes]] = {
    "replace-value": replace_value, "rename-key": rename_key, "drop-key": drop_key, "delete-line": delete_line,
    "duplicate-line": duplicate_line, "reindent-line": reindent_line, "truncate": truncate,
    "insert-text": insert_bytes, "insert-raw-bytes": insert_raw, "append-document": append_document,
    "replace-document": replace_document,
}

texts = st.one_of(st.sampled_from(NASTY_VALUES), st.text(max_size=40),
                  st.integers(-(2**70), 2**70).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr))


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


mutated_specs = given(target=st.sampled_from(SPEC_FILES), mutation=st.sampled_from(sorted(MUTATIONS)),
                      steps=st.lists(st.tuples(st.integers(0, 10**6), texts), min_size=1, max_size=3))


def mutated_spec_is_valid_or_one_clear_error(target: str, mutation: str, steps: list[tuple[int, str]]) -> None:
    data = COMMITTED[target]
    for position, text in steps:
        data = MUTATIONS[mutation](data, position, text)
    event(label(check_mutation(target, data)))


test_mutated_spec_is_valid_or_one_clear_error = fuzz(FUZZ_EXAMPLES)(
    mutated_specs(mutated_spec_is_valid_or_one_clear_error))
test_many_mutated_specs_are_valid_or_one_clear_error = pytest.mark.slow(fuzz(SLOW_FUZZ_EXAMPLES)(
    mutated_specs(mutated_spec_is_valid_or_one_clear_error)))


# --- structural mutations of the parsed data --------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _paths(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


set_fields = given(target=st.sampled_from(SPEC_FILES), pick=st.integers(0, 10**6), value=values,
                   delete=st.booleans())


def spec_with_a_field_set_to_anything_is_valid_or_one_clear_error(target: str, pick: int, value: object,
                                                                 delete: bool) -> None:
    data = yaml.safe_load(COMMITTED[target])
    paths = [p for p in _paths(data) if p]
    path = paths[pick % len(paths)]
    parent = data
    for part in path[:-1]:
        parent = parent[part]  # type: ignore[index]
    if delete:
        del parent[path[-1]]  # type: ignore[attr-defined]
    else:
        parent[path[-1]] = value  # type: ignore[index]
    event(label(check_mutation(target, yaml.safe_dump(data, allow_unicode=True).encode())))


test_spec_with_a_field_set_to_anything_is_valid_or_one_clear_error = fuzz(FUZZ_EXAMPLES // 2)(
    set_fields(spec_with_a_field_set_to_anything_is_valid_or_one_clear_error))
test_many_specs_with_a_field_set_to_anything_are_valid_or_one_clear_error = pytest.mark.slow(
    fuzz(SLOW_FUZZ_EXAMPLES // 2)(set_fields(spec_with_a_field_set_to_anything_is_valid_or_one_clear_error)))


# --- hand-written payloads --------------------------------------------------------------------------


@pytest.mark.parametrize("document", SPECIAL_DOCUMENTS, ids=["billion-laughs", "self-alias", "deep-flow-nesting",
                                                             "deep-mapping-nesting", "two-documents", "merge-key",
                                                             "empty", "comment-only", "bom", "list", "string",
                                                             "complex-key"])
def test_special_document_gives_one_clear_error(document: str) -> None:
    assert check_mutation("attention.yaml", document.encode()).error is not None


def test_alias_bomb_is_refused_naming_the_expansion(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(SPECIAL_DOCUMENTS[0])
    with pytest.raises(SpecError, match="expands to more than"):
        load_specs([path])


def test_python_object_tag_is_never_constructed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    spec = tmp_path / "attention.yaml"
    spec.write_bytes(COMMITTED["attention.yaml"].replace(
        b"seed: 20261126", f"seed: !!python/object/apply:os.system ['touch {marker}']".encode()))
    shutil.copy(REPO / "specs" / "presets.yaml", tmp_path / "presets.yaml")
    with pytest.raises(SpecError, match=re.escape("tag 'tag:yaml.org,2002:python/object/apply:os.system' is not "
                                                  "allowed here")) as info:
        load_specs([spec])
    assert info.value.field == "seed" and info.value.line is not None
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_presets_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path: Path, kind: str) -> None:
    """A spec may name its presets file: a FIFO would block, /dev/zero would never end."""
    presets = tmp_path / "presets.yaml"
    if kind == "fifo":
        os.mkfifo(presets)
        target = "presets.yaml"
    elif kind == "dev-zero":
        target = "/dev/zero"
    else:
        presets.mkdir()
        target = "presets.yaml"
    spec = tmp_path / "attention.yaml"
    spec.write_bytes(COMMITTED["attention.yaml"].replace(b"presets: presets.yaml", f"presets: {target}".encode()))
    with pytest.raises(SpecError, match="not a regular file"):
        load_specs([spec])


def test_oversized_spec_is_refused_without_parsing(tmp_path: Path) -> None:
    spec = tmp_path / "attention.yaml"
    spec.write_bytes(COMMITTED["attention.yaml"] + b"#" * (5 * 1024 * 1024))
    with pytest.raises(SpecError, match="larger than"):
        load_specs([spec])
