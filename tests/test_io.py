"""The one atomic writer (fdistill.io; issue 12: "atomic file writes in ten places")."""
import json
import math
from pathlib import Path

import pytest

from fdistill.io import atomic_path, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text('{"a": 2, "trunc')  # half written when the error comes
            raise RuntimeError("crash")
    assert json.loads(p.read_text()) == {"a": 1}
    assert sorted(q.name for q in p.parent.iterdir()) == ["x.json"]
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and sorted(q.name for q in p.parent.iterdir()) == ["x.json"]


def test_strict_json_refuses_nan_and_default_json_stringifies(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "s.json", {"x": math.nan}, strict=True)
    assert not (tmp_path / "s.json").exists()
    atomic_write_json(tmp_path / "p.json", {"path": tmp_path})
    assert json.loads((tmp_path / "p.json").read_text()) == {"path": str(tmp_path)}


def test_grep_finds_one_atomic_writer():
    """Every temporary-file-then-rename write in the package is fdistill.io's (the directory swap
    of an export and the set-aside of abandoned checkpoints move whole files, they write nothing)."""
    hits = []
    for f in sorted((REPO / "fdistill").rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "os.replace(" in line and not line.lstrip().startswith("#") and "``" not in line:
                hits.append(f"{f.relative_to(REPO)}:{i}")
    allowed = {"fdistill/io.py", "fdistill/engine/export.py", "fdistill/engine/checkpoint.py"}
    assert {h.split(":")[0] for h in hits} <= allowed, hits
    ck = (REPO / "fdistill/engine/checkpoint.py").read_text()
    assert ck.count("os.replace(") == 1 and "set_aside_later_checkpoints" in ck  # the move, not a write
