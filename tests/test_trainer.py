"""The one training engine (fdistill.engine.trainer), through fine-tuning, its first task:
one checkpoint format with fallback to an older file, refusals that lose nothing, and a
2-process torchrun fine-tune equal to the 1-process one at the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdistill.engine.checkpoint import list_checkpoints, load_checkpoint
from fdistill.engine.errors import RunError
from fdistill.eval.finetune import finetune
from tests.test_engine_ddp import _torchrun
from tests.test_eval_finetune import RECIPE, _adapter, _datasets, colour_data  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_and_ends_the_same(colour_data, tmp_path):  # noqa: F811
    recipe = dict(RECIPE, epochs=2)
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    finetune(a, tr, va, output_dir=tmp_path / "a", resume=None, **recipe)
    ref = load_file(tmp_path / "a" / "model_last.safetensors")

    part = finetune(_adapter(), tr, va, output_dir=tmp_path / "b", resume=None, ckpt_interval=3,
                    on_step=lambda s: s == 10, **recipe)
    assert part["steps"] == 10
    names = [p.name for p in list_checkpoints(tmp_path / "b")]
    assert names == ["ckpt_00000009.pt", "ckpt_00000010.pt"]  # keep_last=2
    newest = list_checkpoints(tmp_path / "b")[-1]
    newest.write_bytes(newest.read_bytes()[:2000])  # a crash mid-write on a file system without atomic rename
    rest = finetune(_adapter(), tr, va, output_dir=tmp_path / "b", resume="auto", ckpt_interval=3, **recipe)
    assert rest["steps"] == 16
    got = load_file(tmp_path / "b" / "model_last.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # redone from step 9: the same weights


def test_checkpoints_that_none_loads_are_refused_not_deleted(colour_data, tmp_path):  # noqa: F811
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    finetune(a, tr, va, output_dir=tmp_path, resume=None, on_step=lambda s: s == 2, **RECIPE)
    for p in list_checkpoints(tmp_path):
        p.write_bytes(b"not a checkpoint")
    before = sorted(p.name for p in list_checkpoints(tmp_path))
    with pytest.raises(RunError, match="none loads"):
        finetune(_adapter(), tr, va, output_dir=tmp_path, resume="auto", **RECIPE)
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == before


def test_a_checkpoint_names_the_command_that_wrote_it(colour_data, tmp_path):  # noqa: F811
    a = _adapter()
    tr, va = _datasets(colour_data, a)
    finetune(a, tr, va, output_dir=tmp_path, resume=None, on_step=lambda s: s == 2, **RECIPE)
    path = list_checkpoints(tmp_path)[-1]
    ck = load_checkpoint(path, task="finetune")
    assert ck["task"] == "finetune" and ck["progress"]["step"] == 2 and ck["task_state"]["num_classes"] == 4
    with pytest.raises(RunError, match="checkpoint of `fdistill finetune`, not of `fdistill distill`"):
        load_checkpoint(path, task="distill")


_DDP_SCRIPT = """
import sys, torch
from fdistill.data import build_classification_dataset, eval_transform
from fdistill.engine.distributed import init_distributed, shutdown
from fdistill.eval.finetune import finetune
from fdistill.models.loading import StudentAdapter
from fdistill import create_student

root, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
env = init_distributed("cpu")
torch.manual_seed(0)
s = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
a = StudentAdapter(s, name="tiny-student")
tf = eval_transform(32)  # no random augmentation: every process sees what one process would
tr, va = build_classification_dataset(root, "train", tf), build_classification_dataset(root, "val", tf)
m = finetune(a, tr, va, output_dir=out, resume=None, env=env, device=env.device, epochs=2, warmup_epochs=0.3,
             batch_size=batch, num_workers=0, lr=3e-3, warmup_lr=1e-5, min_lr=1e-5, layer_decay=0.75,
             drop_path_rate=0.0, mixup=None, label_smoothing=0.1, progress=False)
if env.is_main:
    print("TOP1", m["top1"], "STEPS", m["steps"])
shutdown(env)
"""


@pytest.mark.slow
def test_two_process_finetune_matches_one_process(colour_data, tmp_path):  # noqa: F811
    """Same global batch (2 x 16 vs 1 x 32): the same samples per step, gradients averaged by
    DDP, metrics all-reduced, rank 0 writing. Stated tolerance: weights within 1e-4 (float
    reassociation of the gradient all-reduce, through 16 AdamW steps), the same top-1."""
    script = tmp_path / "ft.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    one = subprocess.run([sys.executable, str(script), str(colour_data), str(tmp_path / "one"), "32"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_torchrun() + ["--standalone", "--nproc_per_node=2", str(script), str(colour_data),
                                        str(tmp_path / "two"), "16"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    res = lambda out: out.stdout.split("TOP1")[1].split()  # noqa: E731
    (top1_one, _, steps_one), (top1_two, _, steps_two) = res(one), res(two)
    assert steps_one == steps_two == "16" and float(top1_one) == float(top1_two)
    w1, w2 = load_file(tmp_path / "one" / "model_last.safetensors"), load_file(tmp_path / "two" / "model_last.safetensors")
    assert w1.keys() == w2.keys()
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert worst < 1e-4, worst
    ck = load_checkpoint(list_checkpoints(tmp_path / "two")[-1], task="finetune")
    assert ck["progress"]["world_size"] == 2 and len(ck["rng"]["per_rank"]) == 2


def test_distillation_commands_refuse_a_finetune_checkpoint_by_name(colour_data, tmp_path):  # noqa: F811
    """Export, model loading and distillation's resume read distillation checkpoints only: a
    fine-tuning one (the same format) is named as such, not failed on a missing key."""
    from fdistill.engine.export import export_student
    from fdistill.models.loading import load_model

    a = _adapter()
    tr, va = _datasets(colour_data, a)
    finetune(a, tr, va, output_dir=tmp_path / "ft", resume=None, on_step=lambda s: s == 2, **RECIPE)
    path = list_checkpoints(tmp_path / "ft")[-1]
    with pytest.raises(RunError, match="checkpoint of `fdistill finetune`"):
        load_model(str(path))
    with pytest.raises(RunError, match="checkpoint of `fdistill finetune`"):
        export_student(str(path), output=tmp_path / "export")


def test_the_cli_finetune_of_a_random_model_is_the_same_in_every_process(tmp_path):
    """torch seeds its generator from the OS at start-up; the fine-tune of a randomly initialised
    model (a baseline) differed from process to process, so an interrupted and resumed run could
    not even be compared with an uninterrupted one (found by benchmarks/fault_review.py)."""
    kw = '{"pretrained": false, "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}'
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("a", "b"):
        p = subprocess.run([sys.executable, "-m", "fdistill.cli.main", "finetune", "--config",
                            "configs/finetune/tiny_cpu.yaml", "--model", "timm:vit_tiny_patch16_224", "--model-kwargs",
                            kw, "--train", "synthetic:128", "max_steps=3", "data.batch_size=32",
                            "--output", str(tmp_path / name)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    a, b = (load_file(tmp_path / n / "model_last.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
