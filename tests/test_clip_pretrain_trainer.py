"""CLIP pre-training (``fdistill pretrain-clip``) runs on the one training engine: a run stopped
part-way and resumed ends with the same weights and the same recorded losses as one that was not
stopped; another recipe is refused; starting over removes the earlier run's checkpoints."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fdistill.demo.clip_pretrain import pretrain_clip_on
from fdistill.engine.checkpoint import list_checkpoints
from fdistill.engine.errors import RunError

# a very small CLIP: 16 px, patch 8 (2x2 tokens), width 32, 1 layer per tower
CFG = dict(embed_dim=16,
           vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2.0),
           text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
RUN = dict(model_cfg=CFG, steps=6, batch_size=8, lr=1e-3, warmup_steps=2, seed=0, progress=False, ckpt_interval=2)


def _weights(folder):
    return load_file(str(folder / "open_clip_model.safetensors"))


def _run(folder, **kw):
    return pretrain_clip_on("synthetic:64", folder, **dict(RUN, **kw))


def test_a_stopped_and_resumed_pretraining_equals_the_uninterrupted_one(tmp_path):
    full = _run(tmp_path / "a", resume=None)
    assert full["steps_run"] == 6 and len(full["curve"]) >= 2

    part = _run(tmp_path / "b", resume=None, max_steps=3)  # a prefix of the same run (the schedule spans 6)
    assert part["steps_run"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1].startswith("ckpt_")
    rest = _run(tmp_path / "b", resume="auto")  # continues from step 3
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the record covers the whole run, the first steps restored from the checkpoint
    assert rest["curve"] == full["curve"] and rest["prefix"] == full["prefix"]
    assert rest["loss_last"] == full["loss_last"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("logit_scale" in r for r in rows if "loss" in r)


def test_the_logit_scale_is_clamped_after_every_update(tmp_path):
    """open_clip's training clamps the learned temperature to [0, log 100] after each update; a huge
    learning rate would push it past that within a step."""
    import math

    _run(tmp_path, resume=None, lr=50.0, steps=2, warmup_steps=0)
    scale = _weights(tmp_path)["logit_scale"]
    assert 0.0 <= float(scale) <= math.log(100) + 1e-6


def test_resume_refuses_another_recipe_and_loses_nothing(tmp_path):
    _run(tmp_path, resume=None, max_steps=2)
    before = sorted(p.name for p in list_checkpoints(tmp_path))
    with pytest.raises(RunError, match="another recipe"):
        _run(tmp_path, resume="auto", lr=2e-3)
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == before


def test_starting_over_removes_the_earlier_checkpoints(tmp_path):
    _run(tmp_path, resume=None, max_steps=4)
    assert any(p.name.endswith("4.pt") for p in list_checkpoints(tmp_path))
    _run(tmp_path, resume=None, max_steps=2, ckpt_interval=None)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert not any(n.endswith("4.pt") for n in names)
