"""The atomic file writers and the strict-JSON spelling of non-finite floats."""

import json

import pytest

from moe_backend import _json_file
from moe_backend._json_file import json_safe, write_json, write_text


def test_json_safe_spells_non_finite_floats():
    data = {"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)], "c": {"d": None, "e": "x"}}
    safe = json_safe(data)
    assert safe == {"a": "nan", "b": [1.0, "inf", ["-inf", 2]], "c": {"d": None, "e": "x"}}
    json.loads(json.dumps(safe, allow_nan=False))  # strict JSON


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "results.json"
    write_json(path, {"rows": [1]})
    assert json.loads(path.read_text()) == {"rows": [1]}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_json_file.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text(path, "half")
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left
