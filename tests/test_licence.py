"""The licence travels with the weights: teacher provenance -> checkpoint -> export, and ``info``."""
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from fdistill import create_teacher
from fdistill.cli.main import main
from fdistill.config import build_config
from fdistill.config.distill import DistillConfig
from fdistill.engine.builders import build_distiller
from fdistill.engine import distill, load_checkpoint
from fdistill.engine.checkpoint import latest_valid_checkpoint, save_checkpoint
from fdistill.engine.export import MODEL_CARD, export_student
from fdistill.engine.info import describe_run, layer_types, teacher_report
from fdistill.teachers.provenance import (RANDOM_INIT_LICENSE, UNKNOWN_LICENSE, cached_hub_model_card_license,
                                          is_non_commercial, license_from_model_card)

from conftest import tiny_hf_clip_folder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)

TIMM_TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)
CLIP_TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
                 text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1))
USER_MODELS = '''
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 8, stride=8)
        self.norm = nn.BatchNorm2d(width)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.stem(x)))

def build(width=16):
    return Net(width)
'''


def card(folder, license, **extra):
    lines = ["---", f"license: {license}", *(f"{k}: {v}" for k, v in extra.items()), "tags: [vision]", "---",
             "", "# a model"]
    (folder / "README.md").write_text("\n".join(lines))


@pytest.mark.parametrize("lic, nc", [("cc-by-nc-4.0", True), ("CC-BY-NC-SA-4.0", True), ("non-commercial", True),
                                     ("research, noncommercial use", True), ("mit", False), ("apache-2.0", False),
                                     ("unknown", False), (RANDOM_INIT_LICENSE, False), ("my licence", False),
                                     (None, False)])
def test_non_commercial_licences_are_recognised(lic, nc):
    assert is_non_commercial(lic) is nc


# -- each adapter -----------------------------------------------------------------------------------
def test_timm_provenance(tmp_path):
    t = create_teacher("timm:vit_tiny_patch16_224", pretrained=False, **TIMM_TINY)
    assert t.provenance == {"spec": "timm:vit_tiny_patch16_224", "weights": None, "license": RANDOM_INIT_LICENSE,
                            "license_source": None}
    f = tmp_path / "vit_tiny_weights.safetensors"
    save_file({k: v.contiguous() for k, v in t.model.state_dict().items()}, str(f))
    # a local file under a tag: the tag's licence as timm's pretrained_cfg states it
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    t = create_teacher(f"timm:{name}", checkpoint=str(f), **TIMM_TINY)
    stated = t.model.pretrained_cfg.get("license")
    assert stated and t.provenance["license"] == stated and t.provenance["weights"] == f.name
    assert t.provenance["spec"] == f"timm:{name}" and "pretrained_cfg" in t.provenance["license_source"]
    # a file under no tag: timm's default tag says nothing about it
    t = create_teacher("timm:vit_tiny_patch16_224", checkpoint=str(f), **TIMM_TINY)
    assert t.provenance["license"] == UNKNOWN_LICENSE and t.provenance["weights"] == f.name
    t = create_teacher("timm:vit_tiny_patch16_224", checkpoint=str(f), license="cc-by-nc-4.0", **TIMM_TINY)
    assert t.provenance["license"] == "cc-by-nc-4.0" and t.provenance["license_source"] == "user (license=)"


def test_timm_provenance_reads_the_pretrained_cfg():
    import timm

    from fdistill.teachers.timm_teacher import timm_provenance

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_TINY)
    m.pretrained_cfg = {**m.pretrained_cfg, "tag": "some_tag", "license": "cc-by-nc-4.0"}
    p = timm_provenance("vit_tiny_patch16_224.some_tag", m, loaded=True)
    assert p["weights"] == "some_tag" and p["license"] == "cc-by-nc-4.0"
    m.pretrained_cfg = {k: v for k, v in m.pretrained_cfg.items() if k != "license"}
    assert timm_provenance("vit_tiny_patch16_224", m, loaded=True)["license"] == UNKNOWN_LICENSE
    assert timm_provenance("vit_tiny_patch16_224", m, loaded=False)["license"] == RANDOM_INIT_LICENSE


def test_open_clip_provenance(tmp_path):
    from open_clip.pretrained import get_pretrained_cfg

    from fdistill.teachers.open_clip_teacher import open_clip_provenance

    t = create_teacher("open_clip:tiny", model_cfg=CLIP_TINY, pretrained=False)
    assert t.provenance["weights"] is None and t.provenance["license"] == RANDOM_INIT_LICENSE
    f = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in t.clip_model.state_dict().items()}, str(f))
    t = create_teacher("open_clip:tiny", model_cfg=CLIP_TINY, checkpoint=str(f))
    assert t.provenance == {"spec": "open_clip:tiny", "weights": f.name, "license": UNKNOWN_LICENSE,
                            "license_source": None}
    t = create_teacher("open_clip:tiny", model_cfg=CLIP_TINY, checkpoint=str(f), license="apache-2.0")
    assert t.provenance["license"] == "apache-2.0"
    # local-dir: the folder's model card
    folder = tmp_path / "my-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=CLIP_TINY)))
    save_file({k: v.contiguous() for k, v in t.clip_model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    card(folder, "cc-by-nc-4.0")
    t = create_teacher(f"open_clip:local-dir:{folder}")
    assert t.provenance["weights"] == "my-clip" and t.provenance["license"] == "cc-by-nc-4.0"
    assert t.provenance["license_source"] == "model card"
    # pretrained tags: open_clip states no licence, fdistill's short table knows the famous ones
    assert "license" not in get_pretrained_cfg("ViT-B-16", "openai")
    p = open_clip_provenance("open_clip:ViT-B-16/openai", "ViT-B-16", "openai", "/cache/w.bin",
                             tag_cfg=get_pretrained_cfg("ViT-B-16", "openai"), cache_dir=str(tmp_path / "none"))
    assert p["weights"] == "openai" and p["license"] == "mit" and "OPEN_CLIP_TAG_LICENSES" in p["license_source"]
    p = open_clip_provenance("open_clip:ViT-B-16/metaclip_400m", "ViT-B-16", "metaclip_400m", "/w.bin",
                             cache_dir=str(tmp_path / "none"))
    assert p["license"] == "cc-by-nc-4.0"
    p = open_clip_provenance("open_clip:ViT-B-16/yfcc15m", "ViT-B-16", "yfcc15m", "/w.bin",
                             cache_dir=str(tmp_path / "none"))
    assert p["license"] == UNKNOWN_LICENSE


def test_hf_provenance_from_the_model_card(tmp_path):
    _, _, folder = tiny_hf_clip_folder(tmp_path)
    t = create_teacher(f"hf:{folder}")
    assert t.provenance["weights"] == folder.name and t.provenance["license"] == UNKNOWN_LICENSE  # no card
    card(folder, "cc-by-nc-4.0")
    t = create_teacher(f"hf:{folder}")
    assert t.provenance == {"spec": f"hf:{folder}", "weights": folder.name, "license": "cc-by-nc-4.0",
                            "license_source": "model card"}
    assert create_teacher(f"hf:{folder}", license="mit").provenance["license"] == "mit"
    assert create_teacher(f"hf:{folder}", pretrained=False).provenance["license"] == RANDOM_INIT_LICENSE
    card(folder, "other", license_name="acme-research")
    assert license_from_model_card(folder / "README.md") == "other (acme-research)"
    assert license_from_model_card(tmp_path / "nope.md") is None


def test_hub_model_card_is_read_from_the_cache_only(tmp_path):
    snap = tmp_path / "models--org--net" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "models--org--net" / "refs").mkdir()
    (tmp_path / "models--org--net" / "refs" / "main").write_text("a" * 40)
    card(snap, "cc-by-nc-sa-4.0")
    assert cached_hub_model_card_license("org/net", cache_dir=str(tmp_path)) == "cc-by-nc-sa-4.0"
    assert cached_hub_model_card_license("org/other", cache_dir=str(tmp_path)) is None


def test_python_provenance_license_kwarg(tmp_path):
    src = tmp_path / "nets.py"
    src.write_text(USER_MODELS)
    t = create_teacher(f"python:{src}:build", img_size=32)
    assert t.provenance["weights"] == "<factory>" and t.provenance["license"] == UNKNOWN_LICENSE
    w = tmp_path / "net.safetensors"
    save_file(t.model.state_dict(), str(w))
    t = create_teacher(f"python:{src}:build", img_size=32, weights=str(w), license="cc-by-nc-4.0")
    assert t.provenance == {"spec": f"python:{src}:build", "weights": "net.safetensors", "license": "cc-by-nc-4.0",
                            "license_source": "user (license=)"}
    # given among the factory's kwargs, it is taken out before build() (which takes no license) runs
    t = create_teacher(f"python:{src}:build", img_size=32, factory_kwargs=dict(width=8, license="mit"))
    assert t.provenance["license"] == "mit" and t.embed_dim == 8
    assert create_teacher(f"python:{src}:build", img_size=32, pretrained=False,
                          license="mit").provenance["license"] == RANDOM_INIT_LICENSE


# -- activation / norm / grid / licence in info -----------------------------------------------------
def test_layer_types_tell_quickgelu_from_gelu(tmp_path):
    t = create_teacher("timm:vit_base_patch16_clip_quickgelu_224.openai", pretrained=False, **TIMM_TINY)
    assert layer_types(t.model, "activation") == {"QuickGELU": 1}
    assert layer_types(t.model, "norm") == {"LayerNorm": 4}
    t = create_teacher("timm:vit_tiny_patch16_224", pretrained=False, **TIMM_TINY)
    assert layer_types(t.model, "activation") == {"GELU": 1}
    oc = create_teacher("open_clip:tiny", model_cfg=dict(CLIP_TINY, quick_gelu=True), pretrained=False)
    assert layer_types(oc.model, "activation") == {"QuickGELU": 1}
    _, _, folder = tiny_hf_clip_folder(tmp_path)
    assert layer_types(create_teacher(f"hf:{folder}").model, "activation") == {"QuickGELUActivation": 2}


def _python_teacher_run(tmp_path, license="cc-by-nc-4.0"):
    src = tmp_path / "nets.py"
    src.write_text(USER_MODELS)
    w = tmp_path / "teacher_weights.safetensors"
    save_file(create_teacher(f"python:{src}:build", img_size=32).model.state_dict(), str(w))
    out = tmp_path / "run"
    overrides = [
        f"teacher.spec=python:{src}:build",
        f"teacher.kwargs={{img_size: 32, weights: {w}, license: {license}}}",
        "student.arch=vit_tiny", "student.img_size=32", "student.patch_size=8", "student.embed_dim=32",
        "student.depth=1", "student.num_heads=2", "data.path=synthetic:16", "data.batch_size=8",
        "data.num_workers=0", "train.max_steps=1", "train.precision=fp32", "train.device=cpu",
        f"train.output={out}"]
    return build_config(DistillConfig, None, overrides), w


def test_info_reports_activation_norm_grid_and_licence(tmp_path):
    cfg, w = _python_teacher_run(tmp_path)
    rep = teacher_report(build_distiller(cfg, device=torch.device("cpu")))
    assert rep["activation"] == {"ReLU": 1} and rep["norm"] == {"BatchNorm2d": 1}
    assert rep["grid"] == [4, 4] and rep["input_size"] == [32, 32] and rep["prefix_tokens"] == 0
    assert rep["alignment"]["mode"] == "none" and rep["alignment"]["student_grid"] == [4, 4]
    assert rep["weights"] == w.name and rep["license"] == "cc-by-nc-4.0"
    text = describe_run(cfg)
    assert "activation  ReLU x1" in text and "norm        BatchNorm2d x1" in text
    assert "0 prefix + 4x4 grid at input 32x32" in text and "alignment   none:" in text
    assert f"weights     {w.name}" in text and "license     cc-by-nc-4.0" in text and "NON-COMMERCIAL" in text


# -- checkpoint -> export ---------------------------------------------------------------------------
def test_licence_goes_from_checkpoint_to_export(tmp_path, capsys, caplog):
    import timm

    cfg, w = _python_teacher_run(tmp_path)
    run = distill(cfg).run_dir
    ckpt = load_checkpoint(latest_valid_checkpoint(run))
    prov = ckpt["teacher"]["provenance"]
    assert prov == {"spec": cfg.teacher.spec, "weights": w.name, "license": "cc-by-nc-4.0",
                    "license_source": "user (license=)"}

    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="fdistill.engine.export"):
        assert main(["export", str(run), "--format", "timm"]) == 0
    out = capsys.readouterr().out
    assert "license cc-by-nc-4.0" in out and "WARNING" in out and "NON-COMMERCIAL" in out
    assert any("NON-COMMERCIAL" in r.getMessage() and "inherits" in r.getMessage() for r in caplog.records)
    folder = run / "export_timm"
    cfg_json = json.loads((folder / "config.json").read_text())
    assert cfg_json["teacher"]["spec"] == cfg.teacher.spec and cfg_json["teacher"]["weights"] == w.name
    assert cfg_json["teacher"]["license"] == "cc-by-nc-4.0"
    assert cfg_json["pretrained_cfg"]["license"] == "cc-by-nc-4.0" and cfg_json["pretrained_cfg"]["tag"] == "fdistill"
    assert "derived" in cfg_json["pretrained_cfg"]["notes"][0]
    assert json.loads((folder / "fdistill_export.json").read_text())["teacher"]["provenance"] == prov
    text = (folder / MODEL_CARD).read_text()
    assert "derived" in text and w.name in text and "cc-by-nc-4.0" in text and "NON-COMMERCIAL" in text
    assert license_from_model_card(folder / MODEL_CARD) == "cc-by-nc-4.0"  # the card's front matter
    timm.create_model(f"local-dir:{folder}", pretrained=True)  # the extra fields do not bother timm
    # the exported student as a teacher in turn: the licence keeps travelling
    again = create_teacher(f"timm:local-dir:{folder}").provenance
    assert again["license"] == "cc-by-nc-4.0" and again["weights"] == "export_timm"

    # a checkpoint written before provenance was recorded exports as "unknown", with no warning
    del ckpt["teacher"]["provenance"]
    old = save_checkpoint(tmp_path / "old" / "checkpoints" / "ckpt_00000001.pt", ckpt)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fdistill.engine.export"):
        out_dir = export_student(old, format="safetensors", output=tmp_path / "old_export")
    info = json.loads((out_dir / "fdistill_export.json").read_text())
    assert info["teacher"]["provenance"]["license"] == "unknown"
    assert info["teacher"]["provenance"]["spec"] == cfg.teacher.spec
    assert "unknown" in (out_dir / MODEL_CARD).read_text()
    assert not any("NON-COMMERCIAL" in r.getMessage() for r in caplog.records)
