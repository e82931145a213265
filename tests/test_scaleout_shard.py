"""``score``/``heatmap --shard I/N`` (issue #16): a stable split whose shards together equal one unsharded run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.data.sharding import Shard, shard_of
from surfaceinspect.errors import EXIT_DEFECT, EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE, ConfigError
from surfaceinspect.storage import modeldir

NAMES = [f"line{i % 7}/cam_{i:05d}.png" for i in range(2000)] + ["ünïcode/名前.png", "a b/c,d.jpg", "=x.png"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
def test_shards_are_disjoint_and_cover_everything(count):
    shards = [Shard(i, count) for i in range(count)]
    owners = Counter(sum(s.contains(name) for s in shards) for name in NAMES)
    assert owners == {1: len(NAMES)}  # every name in exactly one shard
    sizes = [sum(s.contains(name) for name in NAMES) for s in shards]
    # a hash split is balanced: no shard far from its share
    assert max(sizes) <= 1.25 * len(NAMES) / count + 5 and min(sizes) >= 0.75 * len(NAMES) / count - 5


def test_select_keeps_order_and_uses_the_path_relative_to_the_root(tmp_path):
    root_a, root_b = tmp_path / "mount_a" / "data", tmp_path / "elsewhere"
    rel = [PurePosixPath(n) for n in NAMES[:200]]
    for count in (3, 5):
        for index in range(count):
            shard = Shard(index, count)
            picked_a = [p.relative_to(root_a) for p in shard.select([root_a / r for r in rel], root_a)]
            picked_b = [p.relative_to(root_b) for p in shard.select([root_b / r for r in rel], root_b)]
            assert picked_a == picked_b == [r for r in rel if shard.contains(r)]


def test_split_is_stable_across_processes_versions_and_separators():
    # Fixed expectations: a change of hash would make shards of two versions overlap or miss images.
    assert [shard_of(f"img_{i:03d}.png", 4) for i in range(12)] == [0, 2, 2, 1, 2, 3, 1, 3, 1, 1, 1, 3]
    assert shard_of(PureWindowsPath("sub\\dir\\x.png"), 7) == shard_of(PurePosixPath("sub/dir/x.png"), 7)
    assert shard_of(PureWindowsPath("sub\\dir\\x.png"), 7) == shard_of("sub/dir/x.png", 7)
    # NFC and NFD spellings of a name (Linux vs macOS) land in the same shard
    assert shard_of("caf\u00e9.png", 5) == shard_of("cafe\u0301.png", 5)
    code = "from surfaceinspect.data.sharding import shard_of; print([shard_of(f'n{i}.png', 9) for i in range(50)])"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout
        for seed in ("1", "2", "random")
    }
    assert len(outputs) == 1 and outputs.pop().startswith("[")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4/4", "I counts from 0"),
        ("-1/4", "between 0 and 3"),
        ("1/0", "N must be at least 1"),
        ("two/4", "expected I/N"),
        ("2", "expected I/N"),
    ],
)
def test_bad_shard_values_are_one_line_usage_errors(text, message, toy_method, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Shard.parse(text)
    (tmp_path / "in").mkdir()
    for command in (["score", tmp_path / "in"], ["heatmap", tmp_path / "in", "--out", tmp_path / "h"]):
        result = run(*command, "--shard", text)
        assert result.exit_code == EXIT_USAGE, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "h").exists()  # refused before anything was written


@pytest.fixture
def trained(toy_method, synthetic_dataset):
    result = run("train", "--no-export", "-m", "toy", synthetic_dataset / "train" / "good", "--seed", "0", "-q")
    assert result.exit_code == EXIT_OK, result.output
    return modeldir.latest_run()


@pytest.fixture
def mixed(synthetic_dataset, tmp_path) -> Path:
    """Good and defective images in subfolders, plus an unreadable file."""
    root = tmp_path / "mixed"
    shutil.copytree(synthetic_dataset / "test", root)
    (root / "good" / "broken.png").write_bytes(b"not a png")
    return root


def _jsonl(path: Path) -> list[dict]:
    """The records of a file, without their ``time`` (when each verdict was made differs from run to run)."""
    return [_timeless(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]


def _timeless(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time"}


def _as_set(rows: list[dict]) -> Counter:
    return Counter(json.dumps(row, sort_keys=True) for row in rows)


def _expected_exit(rows: list[dict]) -> int:
    verdicts = {r["verdict"] for r in rows}
    return EXIT_DEFECT if "defect" in verdicts else EXIT_UNREADABLE if "error" in verdicts else EXIT_OK


def test_concatenated_shard_records_equal_the_unsharded_run(trained, mixed, tmp_path):
    full = tmp_path / "full.jsonl"
    assert run("score", mixed, "--output", full, "-q").exit_code == EXIT_DEFECT
    full_rows = _jsonl(full)
    assert len(full_rows) == 18 and any(r["verdict"] == "error" for r in full_rows)
    count = 3
    shard_rows, csv_rows = [], []
    for index in range(count):
        out = tmp_path / f"shard-{index}.jsonl"
        result = run("score", mixed, "--shard", f"{index}/{count}", "--output", out, "-q")
        rows = _jsonl(out)
        assert rows, "with 18 images no shard of 3 is empty here"
        assert result.exit_code == _expected_exit(rows), (index, result.output)  # only its own images count
        assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # each shard in path order
        shard_rows += rows
        out_csv = tmp_path / f"shard-{index}.csv"
        run("score", mixed, "--shard", f"{index}/{count}", "--output", out_csv, "-q")
        with open(out_csv, newline="", encoding="utf-8") as handle:
            csv_rows += [_timeless(row) for row in csv.DictReader(handle)]
    assert _as_set(shard_rows) == _as_set(full_rows)
    assert sorted(shard_rows, key=lambda r: r["path"]) == full_rows  # sorting by path restores the unsharded order
    run("score", mixed, "--output", tmp_path / "full.csv", "-q")
    with open(tmp_path / "full.csv", newline="", encoding="utf-8") as handle:
        full_csv = [_timeless(row) for row in csv.DictReader(handle)]
    assert _as_set(csv_rows) == _as_set(full_csv)


def test_a_shard_with_no_images_succeeds_with_an_empty_output(trained, synthetic_dataset, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(synthetic_dataset / "test" / "good" / "000.png", folder / "000.png")
    owner = shard_of("000.png", 2)
    empty = tmp_path / "empty.jsonl"
    result = run("score", folder, "--shard", f"{1 - owner}/2", "--output", empty)
    assert result.exit_code == EXIT_OK, result.output
    assert empty.read_text() == "" and "0 of 1 images" in result.output
    assert run("score", folder, "--shard", f"{owner}/2", "--output", tmp_path / "own.jsonl", "-q").exit_code == 0
    assert [r["path"] for r in _jsonl(tmp_path / "own.jsonl")] == ["000.png"]


def test_heatmap_shards_split_the_gallery_and_say_which_shard(trained, mixed, tmp_path):
    run("heatmap", mixed, "--out", tmp_path / "all", "-q")
    overlays = lambda folder: {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}  # noqa: E731
    union: list[str] = []
    for index in range(2):
        out = tmp_path / f"h{index}"
        result = run("heatmap", mixed, "--shard", f"{index}/2", "--out", out, "--output", tmp_path / f"h{index}.jsonl")
        assert result.exit_code == _expected_exit(_jsonl(tmp_path / f"h{index}.jsonl")), result.output
        union += sorted(overlays(out))
        page = (out / "index.html").read_text(encoding="utf-8")
        assert f"<dt>shard</dt><dd>{index} of 2 (numbered 0..1)" in page
    assert sorted(union) == sorted(overlays(tmp_path / "all")) and len(union) == len(set(union))
    assert "<dt>shard</dt>" not in (tmp_path / "all" / "index.html").read_text(encoding="utf-8")
