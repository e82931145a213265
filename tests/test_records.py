"""Record writers: CSV and JSONL parse and carry every field."""

from __future__ import annotations

import csv
import json

import pytest

from surfaceinspect.errors import ConfigError
from surfaceinspect.storage.records import FIELDS, RecordWriter, ScoreRecord, output_format


def _records():
    return [
        ScoreRecord("a/b,c.png", "defect", 0.9, 0.8, 2, 40, 1, 2, 3, 4, 64, 48),
        ScoreRecord("ümlaut.jpg", "good", 0.1, 0.2, 0, None, None, None, None, None, 10, 10),
        ScoreRecord("bad.png", "error", error='truncated "data"'),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_writers_round_trip(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    writer = RecordWriter.open(path)
    for record in _records():
        writer.write(record)
    writer.close()
    if suffix == ".csv":
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
        assert list(rows[0]) == list(FIELDS)
        assert rows[0]["path"] == "a/b,c.png" and float(rows[0]["score"]) == 0.9 and rows[0]["bbox_height"] == "4"
        assert rows[2]["verdict"] == "error" and rows[2]["error"] == 'truncated "data"' and rows[2]["score"] == ""
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert set(rows[0]) == set(FIELDS)
        assert rows[1]["path"] == "ümlaut.jpg" and rows[2]["score"] is None


def test_output_format_from_extension(tmp_path):
    assert output_format(tmp_path / "x.CSV") == "csv"
    assert output_format(tmp_path / "x.jsonl") == "jsonl"
    with pytest.raises(ConfigError, match=r"\.csv or \.jsonl"):
        output_format(tmp_path / "x.txt")
