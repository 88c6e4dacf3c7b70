"""``fdistill diagnose`` end to end on tiny models of every family (timm ViT, FD student run,
open_clip, Hugging Face, a fine-tuned classifier folder): JSON contents, PNGs, HTML report."""
import json
import math

import pytest
import torch

from fdistill.cli.main import main
from fdistill.diagnostics.commands import DataOptions, ModelRef, measure_attention, run_attention_maps
from fdistill.diagnostics.data import image_batches
from fdistill.diagnostics.models import load_diagnostic_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)

TIMM_KW = dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
OPEN_CLIP_KW = dict(pretrained=False, model_cfg=dict(
    embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)))
COMMON = ["--data", "synthetic:100", "--images", "12", "--batch-size", "6", "--workers", "0", "--no-progress"]


def _save_student_run(run, *, depth=2, heads=2, bias=None, zero_qk=False):
    """A distillation run folder holding one checkpoint of a tiny FD student (the engine's format)."""
    from fdistill import create_student
    from fdistill.engine.checkpoint import checkpoint_path, save_checkpoint

    args = dict(arch="vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=heads)
    s = create_student(**args)
    with torch.no_grad():
        if zero_qk:  # attention logits = the relative position bias only
            for b in s.blocks:
                C = b.attn.qkv.weight.shape[1]
                b.attn.qkv.weight[: 2 * C].zero_()
                b.attn.q_bias.zero_()
        if bias is not None:
            bias(s)
    ckpt = dict(format="fdistill-checkpoint", version=1, config={}, student_args=args,
                model=dict(student=s.state_dict()), teacher=dict(spec="timm:none", kwargs={}, embed_dim=32,
                                                                   num_prefix_tokens=1),
                progress=dict(step=1))
    save_checkpoint(checkpoint_path(run, 1), ckpt)
    return run


def _identity_bias(s):
    """Relative position bias that makes every token attend only to itself."""
    rpb = s.rel_pos_bias
    idx = rpb.relative_position_index  # (T, T) table rows
    table = rpb.relative_position_bias_table
    table.fill_(0.0)
    self_rows = torch.diagonal(idx).unique()  # the (0, 0) offset and cls->cls
    table[self_rows] = 1e4


def _local_bias(s):
    """Head h prefers patches within a radius growing with h: varied, local attention."""
    rpb = s.rel_pos_bias
    gh, gw = rpb.window_size
    n_rel = (2 * gh - 1) * (2 * gw - 1)
    dy = torch.arange(2 * gh - 1).repeat_interleave(2 * gw - 1) - (gh - 1)
    dx = torch.arange(2 * gw - 1).repeat(2 * gh - 1) - (gw - 1)
    dist = torch.sqrt((dy ** 2 + dx ** 2).float())
    table = rpb.relative_position_bias_table
    table.zero_()
    for h in range(table.shape[1]):
        table[:n_rel, h] = -dist * (3.0 / (h + 1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag_models")
    from transformers import ViTConfig, ViTModel

    hf_dir = root / "hf_vit"
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(hf_dir)
    return dict(
        timm=("timm:vit_tiny_patch16_224", TIMM_KW),
        student=(str(_save_student_run(root / "run_local", depth=3, heads=4, bias=_local_bias, zero_qk=True)), None),
        identity=(str(_save_student_run(root / "run_identity", bias=_identity_bias, zero_qk=True)), None),
        open_clip=("open_clip:tiny", OPEN_CLIP_KW),
        cnn=("timm:resnet10t", dict(pretrained=False)),
        hf=(f"hf:{hf_dir}", None),
    )


def _args(models, *names):
    out = []
    for n in names:
        spec, kw = models[n]
        out += ["--model", spec]
        if kw:
            out += ["--model-kwargs", json.dumps(kw)]
        out += ["--label", n]
    return out


def _png_ok(path, min_w=300, min_h=150):
    from PIL import Image

    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert w >= min_w and h >= min_h, (w, h)
    return w, h


def test_attention_distance_all_families(models, tmp_path, capsys):
    out = tmp_path / "dist"
    rc = main(["diagnose", "attention-distance", *_args(models, "timm", "student", "open_clip", "hf"), *COMMON,
               "--out", str(out)])
    assert rc == 0
    js = json.loads((out / "attention_distance.json").read_text())
    assert js["renormalize"] is True and js["exclude_self"] is True and "renormalize=True (default)" in js["note"]
    assert js["num_images"] == 12
    shapes = {m["label"]: (m["layers"], m["heads"]) for m in js["models"]}
    assert shapes == {"timm": (2, 3), "student": (3, 4), "open_clip": (3, 2), "hf": (2, 4)}
    for m in js["models"]:
        d = torch.tensor(m["distance_px"])
        assert d.shape == (m["layers"], m["heads"])
        # 4x4 grid of 8 px patches: distances lie between one step and the corner-to-corner diagonal
        assert torch.all(d >= 8.0 - 1e-4) and torch.all(d <= 8 * 3 * math.sqrt(2) + 1e-4)
        assert m["grid"] == [4, 4] and m["patch_size"] == 8
    # the local student: heads with a steeper distance penalty attend closer (head 0 < head 3)
    st = torch.tensor(next(m for m in js["models"] if m["label"] == "student")["distance_px"])
    assert torch.all(st[:, 0] < st[:, 3] - 1.0)
    w, _ = _png_ok(out / "attention_distance.png", min_w=900)
    assert "renormalize=True" in capsys.readouterr().out


def test_identity_model_gives_identity_map_and_zero_distance(models, tmp_path):
    dm = load_diagnostic_model(models["identity"][0])
    batches = image_batches("synthetic:100", split="val", img_size=dm.img_size, num_images=4, batch_size=2,
                            num_workers=0)
    for renorm in (True, False):
        st = measure_attention(dm, batches, progress=False, renormalize=renorm)
        d = torch.stack(st["distance"])  # one (H,) tensor per layer
        assert d.shape == (st["layers"], 2) and torch.all(d == 0) and torch.all(torch.isfinite(d))
    for a in st["maps"].values():
        assert torch.allclose(a, torch.eye(17), atol=1e-6)
    js = run_attention_maps([ModelRef(models["identity"][0], label="identity")],
                            DataOptions("synthetic:100", images=4, batch_size=2, num_workers=0), tmp_path,
                            progress=False)
    from safetensors.torch import load_file

    maps = load_file(str(tmp_path / "attention_maps.safetensors"))
    for key in js["models"][0]["map_keys"]:
        assert torch.allclose(maps[key], torch.eye(17), atol=1e-6)
    s = js["models"][0]["summary"][0]
    assert s["self_mass"] == pytest.approx(1.0) and s["prefix_mass"] == pytest.approx(1 / 17, abs=1e-6)


def test_attention_maps_cli(models, tmp_path):
    out = tmp_path / "maps"
    rc = main(["diagnose", "attention-maps", *_args(models, "student", "timm", "hf"), *COMMON, "--out", str(out)])
    assert rc == 0
    js = json.loads((out / "attention_maps.json").read_text())
    layers = {m["label"]: m["layers"] for m in js["models"]}
    assert layers == {"student": [1, 2, 3], "timm": [1, 2], "hf": [1, 2]}  # first, second, last three (clipped)
    from safetensors.torch import load_file

    maps = load_file(str(out / "attention_maps.safetensors"))
    for m in js["models"]:
        for key in m["map_keys"]:
            a = maps[key]
            assert a.shape == (17, 17) and torch.allclose(a.sum(-1), torch.ones(17), atol=1e-5)
    _png_ok(out / "attention_maps.png", min_w=500, min_h=500)
    # explicit layers, negative from the end
    rc = main(["diagnose", "attention-maps", *_args(models, "student"), *COMMON, "--layers", "-1", "--out",
               str(tmp_path / "m2")])
    assert rc == 0 and json.loads((tmp_path / "m2" / "attention_maps.json").read_text())["models"][0]["layers"] == [3]


def test_deterministic_given_seed(models, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert main(["diagnose", "attention-distance", *_args(models, "student"), "--data", "synthetic:100",
                     "--images", "5", "--batch-size", "2", "--workers", "0", "--no-progress", "--seed", "3",
                     "--out", str(out)]) == 0
        runs.append(json.loads((out / "attention_distance.json").read_text())["models"][0]["distance_px"])
    assert runs[0] == runs[1]


def test_report_with_loss_landscape(models, tmp_path):
    out = tmp_path / "report"
    rc = main(["diagnose", "report", *_args(models, "student", "timm", "cnn"), *COMMON, "--directions", "2",
               "--alphas", "5", "--head-images", "40", "--landscape-images", "10", "--out", str(out)])
    assert rc == 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "head spread" in html and "<table>" in html
    assert "renormalize=True (default)" in html
    # the CNN has no attention: skipped with a note in the attention sections, in the landscape
    assert "cnn: not shown (no attention layers" in html
    dist = json.loads((out / "attention_distance.json").read_text())
    assert [m["label"] for m in dist["models"]] == ["student", "timm"] and dist["skipped"][0]["label"] == "cnn"
    land = json.loads((out / "loss_landscape.json").read_text())
    assert [m["label"] for m in land["models"]] == ["student", "timm", "cnn"]
    for m in land["models"]:
        assert len(m["loss"]) == 2 and len(m["loss"][0]) == 5 and m["alphas"][2] == 0.0
        assert m["loss"][0][2] == m["loss0"] and m["loss"][1][2] == m["loss0"]
        assert m["num_images"] == 10 and "linear head" in m["classifier"] and m["head_images"] == 40
        assert m["seeds"] == [0, 1]
    for name in ("attention_distance", "attention_maps", "loss_landscape"):
        _png_ok(out / f"{name}.png")
        assert (out / f"{name}.json").is_file()


def test_loss_landscape_on_fine_tuned_classifier(models, tmp_path):
    """A fine-tuning output folder is used as the classifier it is (no head fitted)."""
    cls_mod = pytest.importorskip("fdistill.eval.classifier")
    from safetensors.torch import save_file

    from fdistill.data import SHAPES
    from fdistill.models.loading import load_model

    spec, kw = models["timm"]
    adapter = load_model(spec, **kw)
    model, cspec = cls_mod.build_classifier(adapter, len(SHAPES), global_pool="token", drop_path_rate=0.0,
                                            source=dict(spec=spec, kwargs=kw))
    folder = tmp_path / "ft"
    cls_mod.save_classifier_spec(cspec, list(SHAPES), folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model_best.safetensors"))
    out = tmp_path / "land"
    rc = main(["diagnose", "loss-landscape", "--model", str(folder), "--label", "ft", *COMMON, "--directions", "2",
               "--alphas", "3", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "loss_landscape.json").read_text())["models"][0]
    assert m["classifier"] == "fine-tuned classifier" and m["kind"] == "classifier" and len(m["loss"][0]) == 3
    _png_ok(out / "loss_landscape.png")
    # attention of the same folder: a timm ViT classifier with 3 heads
    rc = main(["diagnose", "attention-distance", "--model", str(folder), *COMMON, "--out", str(tmp_path / "d")])
    assert rc == 0
    js = json.loads((tmp_path / "d" / "attention_distance.json").read_text())
    assert (js["models"][0]["layers"], js["models"][0]["heads"]) == (2, 3)


def test_cnn_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    rc = main(["diagnose", "attention-distance", "--model", "timm:resnet18", "--model-kwargs",
               '{"pretrained": false}', *COMMON, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "timm:resnet18" in err and "no attention" in err and "Traceback" not in err
    rc = main(["diagnose", "attention-distance", "--model", "timm:vit_tiny_patch16_224", "--model-kwargs", "[1]",
               *COMMON, "--out", str(tmp_path)])
    assert rc == 2 and "JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diagnose", "attention-distance", "--model-kwargs", "{}", "--model", "x", *COMMON, "--out", "o"])
    assert "must follow the --model" in capsys.readouterr().err


def test_model_kwargs_mistakes_are_usage_errors_in_every_command():
    """One --model-kwargs parser for the evaluation and diagnostics commands; a command-line
    mistake is a UsageError, not a TeacherError (issue 12)."""
    from fdistill.cli.evaluate import parse_model_kwargs
    from fdistill.errors import TeacherError, UsageError

    assert parse_model_kwargs('{"pretrained": false}') == {"pretrained": False} and parse_model_kwargs(None) == {}
    for bad in ("[1]", "{pretrained: false}"):
        with pytest.raises(UsageError, match="--model-kwargs") as e:
            parse_model_kwargs(bad)
        assert not isinstance(e.value, TeacherError)
