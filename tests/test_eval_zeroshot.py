"""Zero-shot: templates, prompt ensembling by hand, a tiny open_clip model trained so that the
answer is known, and the FD-student path (projector -> de-normalisation -> teacher projection)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fdistill import create_teacher
from fdistill.data import build_classification_dataset, eval_transform
from fdistill.eval.zeroshot import (SIMPLE_TEMPLATES, _token_stats, denormalize_tokens, load_templates,
                                    resolve_classnames, text_classifier, zero_shot, zero_shot_student)
from fdistill.teachers import TeacherError
from fdistill.teachers.base import Teacher, TeacherTokens
from tests.conftest import tiny_hf_clip_folder

TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 50), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


def test_openai_templates_file_matches_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    ours = load_templates("openai")
    assert len(ours) == 80 and ours == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert load_templates("simple") == list(SIMPLE_TEMPLATES)


def test_templates_and_classnames_inputs(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\nitap of a {}.\n\n a {} on a table \n")
    assert load_templates(str(f)) == ["itap of a {}.", "a {} on a table"]
    f.write_text("no placeholder\n")
    with pytest.raises(TeacherError, match="needs a"):
        load_templates(str(f))
    with pytest.raises(TeacherError, match="'openai', 'simple' or a text file"):
        load_templates("no_such_file.txt")
    assert resolve_classnames(["golden_retriever", "tabby"]) == ["golden retriever", "tabby"]
    wnids = [f"n{i:08d}" for i in range(1000)]
    names = resolve_classnames(wnids)
    assert len(names) == 1000 and names[0] == "tench"
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    assert resolve_classnames(["a", "b"], str(tmp_path / "names.txt")) == ["cat", "dog"]
    with pytest.raises(TeacherError, match="2 names for 3 classes"):
        resolve_classnames(["a", "b", "c"], str(tmp_path / "names.txt"))


def test_prompt_ensembling_by_hand():
    table = {"x A": [3.0, 0.0], "y A": [1.0, 1.0], "x B": [0.0, 2.0], "y B": [0.0, -5.0]}
    enc = lambda texts: torch.tensor([table[t] for t in texts])
    W = text_classifier(enc, ["A", "B"], ["x {}", "y {}"])
    r2 = 2 ** -0.5
    a = torch.tensor([1 + r2, r2])
    b = torch.tensor([0.0, 0.0])  # (0, 1) and (0, -1) cancel: the mean is 0 -> normalize gives 0
    assert torch.allclose(W[:, 0], a / a.norm(), atol=1e-6) and torch.allclose(W[:, 1], b)


def test_denormalisation_recovers_tokens():
    g = torch.Generator().manual_seed(0)
    z = F.layer_norm(torch.randn(5, 7, 16, generator=g), (16,))  # standardised tokens
    t = 3.0 * z + 0.5  # every token has channel mean 0.5 and std 3
    stats = _token_stats(t, "standardize") / 5
    assert stats.tolist() == pytest.approx([0.5, 3.0], rel=1e-4)
    assert torch.allclose(denormalize_tokens(F.layer_norm(t, (16,)), "standardize", *stats), t, atol=1e-3)
    s_l2 = _token_stats(t, "l2") / 5
    assert torch.allclose(denormalize_tokens(F.normalize(t, dim=-1), "l2", *s_l2), t, rtol=0.05)


def _colour_folder(root, n, seed):
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.asarray(rgb, np.float32) + rng.integers(-20, 21, (32, 32, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    """A tiny open_clip model trained for a few contrastive steps on (colour image, "a photo of a
    <colour>.") pairs: its zero-shot answer on colour images is then known."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("zs")
    _colour_folder(root / "val", 8, 1)
    t = create_teacher("open_clip:tiny", model_cfg=TINY_CLIP, pretrained=False)
    clip = t.clip_model
    clip.train()
    for p in clip.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3)
    loss_fn = ClipLoss()
    names = list(COLOURS)
    texts = t.tokenizer([f"a photo of a {c}." for c in names])
    mean = torch.tensor(t.mean).view(1, 3, 1, 1)
    std = torch.tensor(t.std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        rgb = torch.tensor([COLOURS[c] for c in names], dtype=torch.float32) / 255
        x = rgb.view(4, 3, 1, 1) + 0.08 * torch.randn(4, 3, 32, 32, generator=g)
        img, txt, scale = clip((x.clamp(0, 1) - mean) / std, texts)
        loss = loss_fn(img, txt, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clip.eval()
    t.freeze()
    for p in clip.parameters():
        p.requires_grad_(False)
    return t, root


def test_zero_shot_of_a_tiny_clip_gives_the_known_answer(trained_clip):
    t, root = trained_clip
    ds = build_classification_dataset(root / "val", "val", eval_transform(32))
    res = zero_shot(t, torch.utils.data.DataLoader(ds, batch_size=16), classnames=ds.classes,
                    templates=["a photo of a {}."], progress=False)
    assert res["top1"] == 100.0 and res["num_classes"] == 4 and "top5" not in res
    # embed_tokens of the adapter's token map is the CLIP image embedding
    x = t.normalize(torch.rand(2, 3, 32, 32))
    assert torch.allclose(t.embed_tokens(t.forward_tokens(x)), t.encode_image(x), atol=1e-5)


class _OracleStudent(Teacher):
    """A stand-in FD student whose projected tokens are exactly the teacher's standardised tokens:
    its zero-shot must equal the teacher's."""

    def __init__(self, teacher):
        super().__init__(nn.Identity(), name="oracle-student", embed_dim=teacher.embed_dim,
                         patch_size=teacher.patch_size, num_prefix_tokens=1, mean=teacher.mean, std=teacher.std,
                         img_size=teacher.img_size)
        self.__dict__["teacher"] = teacher
        self.projector = nn.Linear(teacher.embed_dim, teacher.embed_dim)
        with torch.no_grad():
            self.projector.weight.copy_(torch.eye(teacher.embed_dim))
            self.projector.bias.zero_()

    def _forward_tokens(self, x):
        t = self.teacher.forward_tokens(x)
        z = F.layer_norm(t.full(), t.full().shape[-1:])
        return TeacherTokens(z[:, :1], z[:, 1:], t.grid)


def test_student_path_matches_teacher_for_an_oracle_student(trained_clip):
    t, root = trained_clip
    ds = build_classification_dataset(root / "val", "val", eval_transform(32))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    res = zero_shot_student(_OracleStudent(t), t, loader, loader, classnames=ds.classes,
                            templates=list(SIMPLE_TEMPLATES), progress=False)
    assert res["teacher"]["top1"] == 100.0 and res["student"]["top1"] == 100.0
    assert res["stats"]["images"] == 32 and res["stats"]["cls_std"] > 0
    # a student whose projector predicts nothing useful (zeros) gets no better than chance-level ties
    bad = _OracleStudent(t)
    with torch.no_grad():
        bad.projector.weight.zero_()
    res = zero_shot_student(bad, t, loader, loader, classnames=ds.classes, templates=["a photo of a {}."],
                            progress=False)
    assert res["student"]["top1"] == 25.0  # every image gets the same embedding -> one class


def test_timm_clip_tower_needs_a_head_and_a_text_model(trained_clip, tiny_vit_teacher):
    from fdistill.eval.zeroshot import clip_view

    t, root = trained_clip
    timm_tower = tiny_vit_teacher
    timm_tower.model.reset_classifier(0)
    with pytest.raises(TeacherError, match="no image projection head"):
        clip_view(timm_tower)
    timm_tower.model.reset_classifier(32)  # a 48 -> 32 projection, like CLIP's visual proj
    with pytest.raises(TeacherError, match="--text-model"):
        clip_view(timm_tower)
    ds = build_classification_dataset(root / "val", "val", eval_transform(32))
    res = zero_shot(timm_tower, torch.utils.data.DataLoader(ds, batch_size=16), classnames=ds.classes,
                    templates=["a photo of a {}."], text_model=t, progress=False)
    assert 0.0 <= res["top1"] <= 100.0 and res["num_classes"] == 4
    x = timm_tower.normalize(torch.rand(2, 3, 32, 32))
    view = clip_view(timm_tower, t)
    assert torch.allclose(view.embed_tokens(timm_tower.forward_tokens(x)), timm_tower.model(x), atol=1e-5)


def test_hf_clip_zero_shot_matches_a_direct_computation(tmp_path):
    # an HF CLIPModel folder (tiny, random): the command's scores equal CLIP's own image/text features
    torch.manual_seed(0)
    model, tok, folder = tiny_hf_clip_folder(tmp_path)

    t = create_teacher(f"hf:{folder}")
    ds = build_classification_dataset("synthetic:50", "val", eval_transform(32))
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    templates = ["a {}", "the {}"]
    res = zero_shot(t, loader, classnames=ds.classes, templates=templates, progress=False)
    # the oracle: CLIP's own features, prompt ensembling written out
    with torch.no_grad():
        cols = []
        for c in ds.classes:
            enc = tok([tp.format(c) for tp in templates], padding="max_length", max_length=24, return_tensors="pt")
            e = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            e = F.normalize(getattr(e, "pooler_output", e), dim=-1).mean(0)
            cols.append(F.normalize(e, dim=0))
        W = torch.stack(cols, 1)
        correct = total = 0
        for x, y in loader:
            img = model.get_image_features(pixel_values=t.normalize(x.float() / 255))
            img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
            correct += int(((img @ W).argmax(1) == y).sum())
            total += len(y)
    assert res["top1"] == pytest.approx(100.0 * correct / total)
