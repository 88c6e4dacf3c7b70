"""Every file under configs/ validates against its schema, and the distillation recipes hold the
official FD settings they claim to reproduce."""
from pathlib import Path

import pytest

from fdistill.config import ConfigError, build_config, load_yaml
from fdistill.config.distill import DistillConfig
from fdistill.engine.builders import validate_without_building
from fdistill.config.schemas import SCHEMA_NAMES, build_any_config, infer_schema

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_recipes():
    names = {p.name for p in CONFIGS}
    for n in ("clip_vit_base_300ep.yaml", "clip_vit_base_100ep.yaml", "clip_vit_large_300ep.yaml",
              "dino_vit_base_300ep.yaml", "deit_vit_base_300ep.yaml", "mae_vit_base_300ep.yaml",
              "esvit_swin_base_300ep.yaml", "tiny_cpu.yaml"):
        assert n in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_validates(path):
    # its kind is said by its folder (configs/<kind>/) or its name (configs/demo/<kind>.yaml), and it
    # validates against exactly that schema
    assert path.parent.name in SCHEMA_NAMES or path.stem in SCHEMA_NAMES, f"{path}: kind unknown"
    kind, cfg = build_any_config(path)
    assert kind in (path.parent.name, path.stem)
    if kind == "distill":
        validate_without_building(cfg)


def test_a_recipe_elsewhere_is_recognised_by_the_one_schema_it_fits(tmp_path):
    seg = tmp_path / "my_seg.yaml"
    seg.write_text("num_classes: 150\nreduce_zero_label: true\nscale: [0.5, 1.0]\n")  # scale: segprobe only
    assert infer_schema(seg) == "segprobe"
    kind, cfg = build_any_config(seg, ["epochs=3"])
    assert kind == "segprobe" and cfg.epochs == 3 and cfg.num_classes == 150
    both = tmp_path / "data_only.yaml"
    both.write_text("data:\n  batch_size: 8\n")  # every schema has a data section
    with pytest.raises(ConfigError, match="valid distill, finetune, linprobe, knn, zeroshot, segprobe, segment, depth, detect recipe; say which"):
        infer_schema(both)
    assert build_any_config(both, schema="knn")[1].data.batch_size == 8
    none = tmp_path / "nothing.yaml"
    none.write_text("colour: blue\n")
    with pytest.raises(ConfigError, match="fits no recipe kind"):
        infer_schema(none)
    with pytest.raises(ConfigError, match="unknown schema 'seg'"):
        build_any_config(seg, schema="seg")


@pytest.mark.parametrize("path", [p for p in CONFIGS if "distill" in p.parts], ids=lambda p: p.name)
def test_distill_recipes_say_what_they_reproduce(path):
    head = path.read_text().split("\n\n")[0].lower()
    assert "reproduce" in head or "smoke" in head or "no official config" in head
    if path.name != "tiny_cpu.yaml":
        assert "expect" in path.read_text().lower()


def _cfg(name, *ov):
    return build_config(DistillConfig, REPO / "configs" / "distill" / name, list(ov))


def test_clip_vit_base_300ep_is_the_official_recipe():
    c = _cfg("clip_vit_base_300ep.yaml")
    assert (c.student.arch, c.student.patch_size, c.student.img_size, c.student.pos_embed) == ("vit_base", 16, 224,
                                                                                              "shared_rpb")
    assert c.student.drop_path_rate == 0.2 and c.student.init_values == 0.1
    o = c.optim
    assert (o.base_lr, o.lr, o.lr_batch_denominator, o.weight_decay, o.clip_grad) == (3e-4, None, 512, 0.05, 3.0)
    assert (o.warmup_epochs, o.warmup_lr, o.min_lr, tuple(o.betas), o.eps) == (10, 5e-7, 5e-6, (0.9, 0.999), 1e-8)
    assert c.data.batch_size == 128 and tuple(c.data.scale) == (0.08, 1.0) and c.train.epochs == 300
    assert c.teacher.after_norm and c.distill.norm == "standardize" and c.distill.beta == 2.0
    assert c.teacher.spec == "timm:vit_base_patch16_clip_quickgelu_224.openai"


def test_other_recipes_differ_from_the_base_where_the_official_configs_do():
    c = _cfg("clip_vit_base_100ep.yaml")
    assert c.train.epochs == 100 and c.student.drop_path_rate == 0.1 and tuple(c.data.scale) == (0.67, 1.0)
    c = _cfg("clip_vit_large_300ep.yaml")
    assert (c.student.arch, c.student.patch_size, c.student.drop_path_rate) == ("vit_large", 14, 0.3)
    assert c.teacher.spec == "timm:vit_large_patch14_clip_quickgelu_224.openai"
    for name, spec in (("dino_vit_base_300ep.yaml", "timm:vit_base_patch16_224.dino"),
                       ("deit_vit_base_300ep.yaml", "timm:deit_base_patch16_224.fb_in1k"),
                       ("mae_vit_base_300ep.yaml", "timm:vit_base_patch16_224.mae")):
        c = _cfg(name)
        assert c.teacher.spec == spec and c.student.drop_path_rate == 0.3 and c.optim.base_lr == 3e-4
    c = _cfg("esvit_swin_base_300ep.yaml")
    assert c.student.arch.startswith("timm:swin") and c.student.drop_path_rate == 0.3
    assert (c.optim.base_lr, c.optim.warmup_lr, c.optim.min_lr) == (2e-4, 1e-6, 1e-5)
    outputs = {_cfg(p.name).train.output for p in CONFIGS if "distill" in p.parts}
    assert len(outputs) == len([p for p in CONFIGS if "distill" in p.parts])  # no two recipes share a run folder


def test_unknown_keys_and_wrong_types_are_rejected_with_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: " + str(REPO / "configs/distill/tiny_cpu.yaml") + "\noptim:\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.warmup_epoch'; did you mean 'optim.warmup_epochs'"):
        build_config(DistillConfig, bad)
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer"):
        _cfg("tiny_cpu.yaml", "data.batch_size=big")
    with pytest.raises(ConfigError, match="distill.norm: 'layernorm' is not one of"):
        _cfg("tiny_cpu.yaml", "distill.norm=layernorm")
    with pytest.raises(ConfigError, match="drop_path_rate must be in"):
        _cfg("tiny_cpu.yaml", "student.drop_path_rate=1.5")
    with pytest.raises(ConfigError, match="drop_masked needs"):
        _cfg("tiny_cpu.yaml", "distill.drop_masked=true")
    with pytest.raises(ConfigError, match="student.arch"):
        _cfg("tiny_cpu.yaml", "student.arch=vit_gigantic")
    assert load_yaml(REPO / "configs/distill/clip_vit_large_300ep.yaml")["student"]["patch_size"] == 14


def test_a_partial_section_refines_the_schemas_own_default_for_it(tmp_path):
    """LinprobeConfig's data section defaults to a 16384-image batch (MAE), SegprobeConfig's to 16
    images and bilinear resizing: overriding one key of the section (on the command line or in a
    YAML file) must keep the others, not fall back to EvalDataConfig's generic defaults."""
    from fdistill.config.finetune import EvalDataConfig, KnnConfig, LinprobeConfig, SegprobeConfig

    assert EvalDataConfig().batch_size == 128  # what the section class alone would give
    lp = build_config(LinprobeConfig, None, ["data.img_size=64"])
    assert (lp.data.img_size, lp.data.batch_size) == (64, 16384)
    seg = build_config(SegprobeConfig, None, {"data": {"num_workers": 2}})
    assert (seg.data.batch_size, seg.data.interpolation, seg.data.num_workers) == (16, "bilinear", 2)
    cfg = tmp_path / "knn.yaml"
    cfg.write_text("data:\n  crop_pct: 1.0\n")
    knn = build_config(KnnConfig, cfg)
    assert (knn.data.crop_pct, knn.data.batch_size) == (1.0, 256)
    with pytest.raises(ConfigError, match="unknown config key 'data.batchsize'"):  # still validated
        build_config(LinprobeConfig, None, ["data.batchsize=4"])
