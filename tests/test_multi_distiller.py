"""Multi-teacher distillation (fdistill.multi.MultiTeacherDistiller, ``teachers:`` recipes):
one teacher is exactly FD, two teachers of other widths and grids give the weighted sum of their
FD losses, fitted target statistics survive kill + resume bit-exactly, per-teacher losses reach
metrics.jsonl, and bad configs are refused."""
import json
import os
import signal
import textwrap

import pytest
import torch
import torch.nn as nn

from fdistill import FeatureDistiller, create_student, create_teacher
from fdistill.config import ConfigError, build_config
from fdistill.config.distill import DistillConfig
from fdistill.engine import distill, load_checkpoint
from fdistill.engine.checkpoint import list_checkpoints
from fdistill.losses import feature_distill_loss
from fdistill.multi.distiller import MultiTeacherDistiller, TeacherHead, TeacherSpec

pytestmark = pytest.mark.usefixtures("one_thread")

CNN = textwrap.dedent('''
    import torch.nn as nn

    class SmallCNN(nn.Module):
        """(B, 3, 32, 32) -> (B, 24, 4, 4): another width and grid than the ViT teacher's."""
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.ReLU(), nn.Conv2d(12, 24, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(24, 24, 3, 2, 1))

        def forward_features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.body(x).mean((2, 3))

    def cnn():
        return SmallCNN()
''')


def _vit_teacher():
    torch.manual_seed(1)
    return create_teacher("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1,
                          embed_dim=48, num_heads=2)


def _cnn_teacher(tmp_path):
    f = tmp_path / "cnn_teacher.py"
    f.write_text(CNN)
    torch.manual_seed(2)
    return create_teacher(f"python:{f}:cnn", img_size=32, feature_method="forward_features")


def _student():
    torch.manual_seed(0)
    return create_student("vit_tiny", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                          drop_path_rate=0.0)


def test_one_teacher_is_exactly_fd_loss_and_gradients():
    teacher = _vit_teacher()
    fd = FeatureDistiller(teacher, _student())
    multi = MultiTeacherDistiller([TeacherSpec("clip", teacher)], _student())
    multi.projector["clip"].proj.load_state_dict(fd.projector.state_dict())
    x = torch.rand(4, 3, 32, 32)
    a, b = fd(x), multi(x)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(b["loss_clip"], a["loss"].detach())
    a["loss"].backward()
    b["loss"].backward()
    ga = dict(fd.branch.student.named_parameters())
    for n, p in multi.student.named_parameters():
        assert (p.grad is None and ga[n].grad is None) or torch.equal(p.grad, ga[n].grad), n
    assert torch.equal(multi.projector["clip"].proj.weight.grad, fd.projector.weight.grad)


def test_two_teachers_give_the_weighted_sum_of_their_fd_losses(tmp_path):
    """A ViT teacher (width 48, 8x8 grid, [CLS]) and a python: CNN (width 24, 4x4 grid at 32 px ->
    brought to the student's 8x8, no [CLS]); the total is 0.7 x ViT's FD loss + 0.3 x the CNN's
    patch-only FD loss, each computed here from its own target and head."""
    vit, cnn = _vit_teacher(), _cnn_teacher(tmp_path)
    multi = MultiTeacherDistiller([TeacherSpec("vit", vit, weight=0.7), TeacherSpec("cnn", cnn, weight=0.3)],
                                  _student(), cls_weight=10.0)
    assert multi.targets["cnn"].align != "none" and multi.targets["cnn"].num_prefix_tokens == 0
    x = torch.rand(3, 3, 32, 32)
    out = multi(x)
    with torch.no_grad():
        tokens = multi.student.forward_tokens(multi._normalize(x))  # (B, 1 + 64, 32)
        tv, tc = multi.targets["vit"](x), multi.targets["cnn"](x)  # (B, 65, 48), (B, 64, 24)
        lv = feature_distill_loss(multi.projector["vit"](tokens), tv, cls_weight=10.0, num_prefix_tokens=1)
        lc = feature_distill_loss(multi.projector["cnn"](tokens)[:, 1:], tc, num_prefix_tokens=0)
    assert tv.shape == (3, 65, 48) and tc.shape == (3, 64, 24)
    torch.testing.assert_close(out["loss_vit"], lv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["loss_cnn"], lc, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["loss"], 0.7 * lv + 0.3 * lc, rtol=1e-6, atol=1e-7)
    out["loss"].backward()
    assert all(p.grad is not None for p in multi.projector.parameters())  # both heads learn
    assert all(p.grad is None for p in list(vit.parameters()) + list(cnn.parameters()))  # teachers frozen


def test_summary_and_spatial_targets_and_the_cosine_term(tmp_path):
    vit = _vit_teacher()
    m = MultiTeacherDistiller([TeacherSpec("s", vit, targets="summary"),
                               TeacherSpec("p", vit, targets="spatial", loss="cos_smooth_l1", head="mlp")], _student())
    x = torch.rand(2, 3, 32, 32)
    out = m(x)
    with torch.no_grad():
        tokens = m.student.forward_tokens(m._normalize(x))
        t = m.targets["s"](x)
        ls = feature_distill_loss(m.projector["s"](tokens)[:, :1], t[:, :1], num_prefix_tokens=1, granularity="full")
        pred_p = m.projector["p"](tokens)[:, 1:]
        tgt_p = torch.nn.functional.layer_norm(t[:, 1:], (48,), eps=1e-5)
        smooth = torch.nn.functional.smooth_l1_loss(pred_p, tgt_p, beta=2.0, reduction="none").mean(-1)
        cos = 1 - torch.nn.functional.cosine_similarity(pred_p, tgt_p, dim=-1)
        lp = (smooth + cos).mean()
    torch.testing.assert_close(out["loss_s"], ls, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["loss_p"], lp, rtol=1e-6, atol=1e-7)
    assert isinstance(m.projector["p"].proj, nn.Module) and m.projector["p"].kind == "mlp"


def _multi_cfg(out, *overrides):
    base = [
        "teachers=[{name: vit, spec: 'timm:vit_tiny_patch16_224', norm: phi_s, "
        "kwargs: {pretrained: false, img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}}, "
        "{name: wide, spec: 'timm:vit_tiny_patch16_224', norm: stats, weight: 0.5, head: mlp, targets: spatial, "
        "kwargs: {pretrained: false, img_size: 16, patch_size: 8, depth: 1, embed_dim: 64, num_heads: 2}}]",
        "student.arch=vit_tiny", "student.img_size=16", "student.patch_size=4", "student.embed_dim=32",
        "student.depth=2", "student.num_heads=2", "student.drop_path_rate=0.1",
        "data.path=synthetic:32", "data.batch_size=8", "data.num_workers=0", "multi.stats_images=16",
        "optim.base_lr=0.02", "optim.warmup_epochs=0.5", "optim.min_lr=1e-4",
        "train.epochs=2", "train.precision=fp32", "train.device=cpu", "train.log_interval=1",
        "train.ckpt_interval=100", f"train.output={out}",
    ]
    return build_config(DistillConfig, None, base + list(overrides))


def test_statistics_are_fitted_before_training_and_survive_kill_and_resume(tmp_path):
    ref = tmp_path / "ref"
    r = distill(_multi_cfg(ref))
    assert r.step == 8 and r.complete
    a = load_checkpoint(list_checkpoints(ref)[-1])
    heads = a["model"]["projector"]
    assert bool(heads["vit.norm.fitted"]) and bool(heads["wide.norm.fitted"])
    assert [t["name"] for t in a["teacher"]["teachers"]] == ["vit", "wide"]
    rec = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_vit" in x and "loss_wide" in x for x in rec)  # per-teacher losses logged
    assert "loss_prefix" not in rec[0]  # FD's [CLS] / patch split is per teacher here
    from fdistill.models.loading import load_model

    student = load_model(str(ref))  # the run's student, for every evaluation command
    assert student.embed_dim == 32 and student.forward_tokens(torch.rand(1, 3, 16, 16)).patches.shape == (1, 16, 32)

    out = tmp_path / "run"

    def preempt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    r = distill(_multi_cfg(out), on_step=preempt)
    assert r.stopped_by == "SIGTERM" and r.step == 3
    r = distill(_multi_cfg(out))
    assert r.step == 8 and r.complete
    b = load_checkpoint(list_checkpoints(out)[-1])
    for part in ("student", "projector"):
        assert a["model"][part].keys() == b["model"][part].keys()
        for k in a["model"][part]:
            assert torch.equal(a["model"][part][k], b["model"][part][k]), f"{part}.{k}"


def test_configs_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="either teacher"):
        _multi_cfg(tmp_path, "teacher.spec=timm:vit_small_patch16_224")
    with pytest.raises(ConfigError, match="unique"):
        build_config(DistillConfig, None, ["teachers=[{name: a, spec: 'timm:x'}, {name: a, spec: 'timm:y'}]"])
    with pytest.raises(ConfigError, match="norm"):
        build_config(DistillConfig, None, ["teachers=[{spec: 'timm:x', norm: whiten}]"])
    with pytest.raises(ConfigError, match="single-teacher"):
        from fdistill.engine.builders import build_distiller

        build_distiller(_multi_cfg(tmp_path, "distill.granularity=cls"))


def test_a_resume_after_the_statistics_pass_does_not_redo_it(tmp_path, monkeypatch):
    """The statistics are restored from the checkpoint: a resumed run never refits them."""
    out = tmp_path / "run"
    distill(_multi_cfg(out, "train.max_steps=2"))
    calls = []
    orig = MultiTeacherDistiller.fit_target_norms

    def spy(self, *a, **k):
        calls.append(self.norms_to_fit())
        return orig(self, *a, **k)

    monkeypatch.setattr(MultiTeacherDistiller, "fit_target_norms", spy)
    distill(_multi_cfg(out, "train.max_steps=4"))
    assert calls == []  # resumed: the checkpoint's statistics
    distill(_multi_cfg(tmp_path / "fresh", "train.max_steps=1"))
    assert calls == [["vit", "wide"]]  # a fresh run fits both


def test_info_and_validate_describe_every_teacher(capsys):
    import re

    from fdistill.cli.main import main
    from fdistill.engine.info import describe_run

    text = describe_run(build_config(DistillConfig, "configs/distill/multi_tiny_cpu.yaml"), processes=(1,))
    assert "teacher clip: open_clip:local-dir:fdistill/assets/clip_mini" in text and "norm phi_s" in text
    assert "teacher vit: timm:vit_tiny_patch16_224" in text and "head mlp 64 -> 96" in text
    assert text.count("ms/image here") == 2  # each teacher's measured forward cost
    # ... and its peak memory: bytes allocated above the start on a batch of min(8, batch size)
    peaks = re.findall(r"peak ([0-9.]+) MiB allocated above start on a batch of 8", text)
    assert len(peaks) == 2 and all(float(p) > 0 for p in peaks), text
    for name in ("clip", "vit"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"teacher {name}:"))
        assert "ms/image here" in line and "MiB allocated above start" in line
    assert "# teacher clip" in text and "# teacher vit" in text and "alignment   resize" in text
    assert main(["validate-config", "configs/distill/multi_tiny_cpu.yaml"]) == 0
    assert "clip=open_clip:local-dir:fdistill/assets/clip_mini + vit=timm:vit_tiny_patch16_224" in capsys.readouterr().out
    from fdistill.engine.builders import validate_without_building

    cfg = build_config(DistillConfig, "configs/distill/multi_tiny_cpu.yaml")
    cfg.teachers[1].spec = "timm:no_such_model"
    with pytest.raises(ConfigError, match=r"teachers\[1\] \(vit\).spec: timm has no model"):
        validate_without_building(cfg)


def test_a_run_seen_through_each_head(tmp_path):
    """``load_model(run, head=NAME)`` (``--head NAME`` of the evaluation commands): the student's
    tokens through that trained head, mapped back to the teacher's space by the inverse of its
    fitted normaliser (PHI-S / stats); a single-teacher run or an unknown head is refused."""
    from fdistill.models.loading import load_model

    run = tmp_path / "run"
    distill(_multi_cfg(run, "train.max_steps=3"))
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    x = torch.rand(2, 3, 16, 16)
    plain = load_model(str(run))
    for name, width in (("vit", 48), ("wide", 64)):
        a = load_model(str(run), head=name)
        assert a.embed_dim == width and a.teacher_space
        spec = {t["name"]: t for t in ckpt["teacher"]["teachers"]}[name]
        head = TeacherHead(32, width, kind=spec["head"], norm=spec["norm"])
        head.load_state_dict({k[len(name) + 1:]: v for k, v in ckpt["model"]["projector"].items()
                              if k.startswith(name + ".")})
        with torch.no_grad():
            want = head.norm.inverse(head(plain.model.forward_tokens(x)))  # (B, 1 + 16, width)
            got = a.forward_tokens(x)
        if name == "vit":  # its [CLS] was a target
            torch.testing.assert_close(torch.cat((got.prefix, got.patches), 1), want)
        else:  # targets: spatial -- the head's [CLS] output was never trained and is left out
            assert got.prefix is None and a.num_prefix_tokens == 0
            torch.testing.assert_close(got.patches, want[:, 1:])
    from fdistill.teachers import TeacherError

    with pytest.raises(TeacherError, match="no head 'dino'; its heads are"):
        load_model(str(run), head="dino")


def test_teacher_dropping_keeps_each_samples_worst_fit_teacher(tmp_path):
    vit, cnn = _vit_teacher(), _cnn_teacher(tmp_path)
    m = MultiTeacherDistiller([TeacherSpec("vit", vit), TeacherSpec("cnn", cnn)], _student(), teacher_dropping=True)
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    out = m(x)
    assert 0.5 <= float(out["kept_fraction"]) <= 1.0  # one of two always kept, the other half the time
    out["loss"].backward()
    assert all(p.grad is not None for n, p in m.student.named_parameters() if n != "mask_token")  # (no masking)
    m.eval()
    assert "kept_fraction" not in m(x)  # evaluation: every teacher counts


MULTI_DDP = """
teachers:
  - name: vit
    spec: timm:vit_tiny_patch16_224
    kwargs: {pretrained: false, img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}
    norm: phi_s
  - name: wide
    spec: timm:vit_tiny_patch16_224
    kwargs: {pretrained: false, img_size: 16, patch_size: 8, depth: 1, embed_dim: 64, num_heads: 2}
    norm: stats
    weight: 0.5
    head: mlp
multi: {stats_images: 16}
student: {arch: vit_tiny, img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: 0.0}
data: {path: "synthetic:48", batch_size: 8, num_workers: 0}
optim: {base_lr: 0.02, warmup_epochs: 0.5, min_lr: 1.0e-4}
train: {epochs: 2, precision: fp32, device: cpu, log_interval: 1, ckpt_interval: 100}
"""


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node=2``: each rank fits the statistics on its half of the images and
    the sums are all-reduced, so both fit what one process fits on all of them; then DDP's averaged
    gradient is the one process's, and the weights and heads (with their statistics) agree."""
    from tests.conftest import run_torchrun

    cfg_file = tmp_path / "multi_ddp.yaml"
    cfg_file.write_text(MULTI_DDP)
    two = tmp_path / "two"
    run_torchrun(["-m", "fdistill.cli.main", "distill", "--config", cfg_file, "--output", two, "data.batch_size=4",
                  "train.max_steps=6"])
    one = tmp_path / "one"
    distill(build_config(DistillConfig, cfg_file, [f"train.output={one}", "train.max_steps=6"]))
    a, b = load_checkpoint(list_checkpoints(one)[-1]), load_checkpoint(list_checkpoints(two)[-1])
    assert b["progress"]["world_size"] == 2 and b["progress"]["total_batch"] == a["progress"]["total_batch"] == 8
    for part in ("student", "projector"):
        for k, v in a["model"][part].items():
            torch.testing.assert_close(b["model"][part][k], v, rtol=1e-5, atol=1e-5, msg=f"{part}.{k}")
    la = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(la, lb):
        for k in ("loss", "loss_vit", "loss_wide"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), k


def test_the_timm_export_carries_the_heads(tmp_path):
    """``fdistill export --format timm`` of a multi-teacher run writes heads.safetensors beside the
    backbone; the export seen through a head gives the run's head outputs."""
    from fdistill.engine.export import export_student
    from fdistill.models.loading import load_model

    run = tmp_path / "run"
    distill(_multi_cfg(run, "train.max_steps=2"))
    out = export_student(run, format="timm")
    assert (out / "heads.safetensors").is_file()
    x = torch.rand(2, 3, 16, 16)
    for name in ("vit", "wide"):
        a, b = load_model(str(run), head=name), load_model(str(out), head=name)
        with torch.no_grad():
            ta, tb = a.forward_tokens(x), b.forward_tokens(x)
        torch.testing.assert_close(tb.patches, ta.patches, atol=1e-5, rtol=1e-4)
        assert (ta.prefix is None) == (tb.prefix is None)
    from fdistill.teachers import TeacherError

    single = tmp_path / "single"
    from tests.test_engine_distill import tiny_cfg

    distill(tiny_cfg(single, "train.max_steps=1"))
    with pytest.raises(TeacherError, match="not the export of a multi-teacher run"):
        load_model(str(export_student(single, format="timm")), head="vit")


def test_zero_shot_through_a_clip_head(tmp_path):
    """Oracle: a head that is exactly the identity on the CLIP teacher's own tokens must embed every
    image as the teacher does (so it predicts what the teacher predicts); then the command on a
    trained multi-teacher run reports the student through its CLIP head beside the teacher."""
    from fdistill.assets import teacher_spec
    from fdistill.eval.zeroshot import clip_view, head_clip_view
    from fdistill.models.loading import HeadAdapter, load_model

    clip = load_model(teacher_spec("clip_mini"))
    head = TeacherHead(clip.embed_dim, clip.embed_dim, kind="linear", norm="none")
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(clip.embed_dim))
        head.proj.bias.zero_()
    via = HeadAdapter(clip, head, head_name="clip")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head_clip_view(via, clip).encode_image(x), clip_view(clip).encode_image(x),
                                   atol=1e-5, rtol=1e-5)
    from fdistill.teachers import TeacherError

    std_head = TeacherHead(clip.embed_dim, clip.embed_dim, norm="standardize")
    with pytest.raises(TeacherError, match="cannot be inverted"):
        head_clip_view(HeadAdapter(clip, std_head, head_name="clip"), clip)

    from fdistill.config.finetune import ZeroshotConfig
    from fdistill.eval.commands import run_zeroshot

    run = tmp_path / "run"
    cfg = build_config(DistillConfig, "configs/distill/multi_tiny_cpu.yaml",
                       [f"train.output={run}", "train.max_steps=4", "data.path=synthetic:256", "multi.stats_images=64"])
    distill(cfg)
    res = run_zeroshot(build_config(ZeroshotConfig, None, ["data.num_workers=0"]), model=str(run),
                       model_kwargs={"head": "clip"}, val="synthetic:100", echo=False)
    assert res["head"] == "clip" and 0 <= res["top1"] <= 100 and res["teacher_top1"] > 10  # clip_mini is trained


def test_teachers_stay_outside_the_trained_branch_and_follow_the_run_precision(tmp_path):
    """What DDP wraps (``branch``: the student and the heads) holds no teacher parameter, and in a
    bf16 run the teachers are built in bf16 (``teachers[].dtype: auto``) and run in inference mode."""
    from fdistill.engine.builders import build_distiller

    d = build_distiller(_multi_cfg(tmp_path), precision="bf16")
    branch = {id(p) for p in d.branch.parameters()}
    for name in ("vit", "wide"):
        t = d.targets[name].teacher
        assert not any(id(p) in branch for p in t.parameters())
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in t.parameters())
        assert d.targets[name].teacher_inference_mode
    assert {id(p) for p in d.projector.parameters()} <= branch


def test_losses_divided_by_their_initial_values(tmp_path):
    """multi.normalize_by_initial_steps=2: the first two steps' per-teacher losses are averaged
    into the divisors; afterwards the total is sum_t w_t l_t / l_t(initial), worked here."""
    vit, cnn = _vit_teacher(), _cnn_teacher(tmp_path)
    m = MultiTeacherDistiller([TeacherSpec("vit", vit, weight=2.0), TeacherSpec("cnn", cnn)], _student(),
                              normalize_initial_steps=2)
    xs = [torch.rand(2, 3, 32, 32) for _ in range(3)]
    first = [m(x) for x in xs[:2]]
    init = torch.stack([torch.stack([o["loss_vit"], o["loss_cnn"]]) for o in first]).double().mean(0)
    torch.testing.assert_close(m.balance.initial, init)
    out = m(xs[2])
    want = 2.0 * out["loss_vit"] / init[0] + out["loss_cnn"] / init[1]
    torch.testing.assert_close(out["loss"].double(), want.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.balance.initial, init)  # fixed after warm-up
