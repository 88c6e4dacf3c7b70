"""Checkpoint files: atomic writes, safe and verified loads, newest-valid search, pruning, RNG states."""
import logging
import os
import random

import numpy as np
import pytest
import torch

from fdistill.engine import RunError
from fdistill.engine.checkpoint import (FORMAT, checkpoint_path, clean_partial_writes, latest_valid_checkpoint,
                                        list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint)
from fdistill.engine.rng import capture_rng_state, restore_rng_state


def _ckpt(step, **extra):
    return {"format": FORMAT, "version": 1, "config": {"a": 1}, "student_args": {}, "model": {"w": torch.randn(64, 64)},
            "progress": {"step": step}, **extra}


def test_save_load_round_trip_is_weights_only(tmp_path):
    obj = _ckpt(3, rng=capture_rng_state())
    p = save_checkpoint(checkpoint_path(tmp_path, 3), obj)
    assert p == tmp_path / "checkpoints" / "ckpt_00000003.pt"
    assert [f.name for f in p.parent.iterdir()] == [p.name]  # no temporary file left
    back = load_checkpoint(p)
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["progress"] == {"step": 3}
    torch.load(p, weights_only=True)  # the contract: loadable without unpickling code


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    p = checkpoint_path(tmp_path, 1)
    save_checkpoint(p, _ckpt(1))
    before = p.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(p, _ckpt(2))
    assert p.read_bytes() == before
    assert sorted(f.name for f in p.parent.iterdir()) == [p.name]


def test_clean_partial_writes_removes_crash_leftovers(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / ".ckpt_00000005.pt.123.tmp").write_bytes(b"x")
    save_checkpoint(checkpoint_path(tmp_path, 4), _ckpt(4))
    assert [p.name for p in clean_partial_writes(tmp_path)] == [".ckpt_00000005.pt.123.tmp"]
    assert [p.name for p in d.iterdir()] == ["ckpt_00000004.pt"]


def test_load_rejects_foreign_future_and_incomplete_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"model": {}}, p)
    with pytest.raises(RunError, match="not an fdistill checkpoint"):
        load_checkpoint(p)
    torch.save(_ckpt(1, version=99), p)
    with pytest.raises(RunError, match="version 99"):
        load_checkpoint(p)
    obj = _ckpt(1)
    del obj["progress"]
    torch.save(obj, p)
    with pytest.raises(RunError, match="lacks"):
        load_checkpoint(p)
    with pytest.raises(RunError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": Evil()}, p)
    with pytest.raises(RunError, match="safely"):
        load_checkpoint(p)


def test_latest_valid_skips_corrupt_and_truncated_newest(tmp_path, caplog):
    for s in (10, 20, 30):
        save_checkpoint(checkpoint_path(tmp_path, s), _ckpt(s))
    assert latest_valid_checkpoint(tmp_path).name == "ckpt_00000030.pt"
    p30, p20 = checkpoint_path(tmp_path, 30), checkpoint_path(tmp_path, 20)
    p30.write_bytes(p30.read_bytes()[:-200])  # truncated
    data = bytearray(p20.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    p20.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert latest_valid_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    assert "ckpt_00000030.pt" in caplog.text and "ckpt_00000020.pt" in caplog.text
    assert p30.exists() and p20.exists()  # kept for inspection
    assert latest_valid_checkpoint(tmp_path / "nothing") is None


def test_list_orders_by_step_and_prune_keeps_newest(tmp_path):
    for s in (100, 2, 30, 1000):
        save_checkpoint(checkpoint_path(tmp_path, s), _ckpt(s))
    (tmp_path / "checkpoints" / "notes.txt").write_text("keep me")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_00000002.pt", "ckpt_00000030.pt", "ckpt_00000100.pt", "ckpt_00001000.pt"]
    gone = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in gone] == ["ckpt_00000002.pt", "ckpt_00000030.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt_00000100.pt", "ckpt_00001000.pt", "notes.txt"]
    assert list_checkpoints(tmp_path / "checkpoints") == list_checkpoints(tmp_path)  # either folder works


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    expect = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    p = tmp_path / "rng.pt"
    torch.save(state, p)
    loaded = torch.load(p, weights_only=True)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(loaded)
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])


@pytest.mark.parametrize("wrapped", [False, True])
def test_disk_full_is_one_clear_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, wrapped):
    """Issue 13 (low): a full disk ended in a long torch traceback. Now: one RunError naming the
    last good checkpoint, which is intact, and no temporary file left behind."""
    import errno

    from fdistill.engine import checkpoint as ck

    good = ck.save_checkpoint(tmp_path / "checkpoints" / "ckpt_00000004.pt", {"step": 4})

    def full(obj, f):
        err = OSError(errno.ENOSPC, "No space left on device")
        if wrapped:  # as torch's zip writer reports it
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed") from err
        raise err

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(ck.RunError, match=r"no space left on the device writing .*ckpt_00000008\.pt.*last good "
                                          r"checkpoint is .*ckpt_00000004\.pt"):
        ck.save_checkpoint(tmp_path / "checkpoints" / "ckpt_00000008.pt", {"step": 8})
    monkeypatch.undo()
    assert torch.load(good, weights_only=True)["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt_00000004.pt"]
