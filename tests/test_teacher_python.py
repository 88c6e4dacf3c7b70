"""``python:`` teachers: the user's own CNN and ViT, from a file or an importable module."""
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from fdistill import create_teacher
from fdistill.teachers import TeacherError
from fdistill.weights import WeightsError

USER_MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn

    HEAD_CALLS = [0]


    class TinyCNN(nn.Module):
        """stride-4 CNN: (B, 3, H, W) -> (B, width, H/4, W/4), with a classifier head."""

        def __init__(self, width=8, num_classes=5):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.layer2 = nn.Sequential(nn.Conv2d(4, width, 3, stride=2, padding=1), nn.BatchNorm2d(width))
            self.head = nn.Linear(width, num_classes)

        def forward_features(self, x):
            return torch.relu(self.layer2(self.stem(x)))

        def forward(self, x):
            HEAD_CALLS[0] += 1
            return self.head(self.forward_features(x).mean((2, 3)))


    def cnn(width=8):
        return TinyCNN(width=width)


    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.mlp = nn.Linear(dim, dim)

        def forward(self, x):
            return x + self.mlp(self.norm(x))


    class TinyViT(nn.Module):
        """[CLS] + 4 register tokens + patch tokens, patch 8."""

        def __init__(self, dim=16, img_size=32, patch=8, num_reg=4):
            super().__init__()
            n = (img_size // patch) ** 2
            self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
            self.cls_token = nn.Parameter(torch.randn(1, 1 + num_reg, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, n, dim))
            self.blocks = nn.Sequential(Block(dim), Block(dim))
            self.norm = nn.LayerNorm(dim)

        def forward_features(self, x):
            t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
            t = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), t), dim=1)
            return self.norm(self.blocks(t))

        def forward_nhwc(self, x):
            return self.patch_embed(x).permute(0, 2, 3, 1)

        def logits(self, x):
            return self.forward_features(x)[:, 0]

        def as_dict(self, x):
            return {"tokens": self.forward_features(x)}

        def forward(self, x):
            return self.forward_features(x)[:, 0]


    def vit(**kw):
        return TinyViT(**kw)


    class NoForward(TinyViT):
        forward = nn.Module.forward  # only forward_features, as many backbones


    def no_forward():
        return NoForward()


    def broken():
        raise ValueError("bad config")


    def not_a_module():
        return 3


    NOT_CALLABLE = 5
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_models.py"
    path.write_text(USER_MODELS)
    return path


def _fresh(user_file, name):
    """The factory's own module (the one the teacher imported) and a fresh instance."""
    t = create_teacher(f"python:{user_file}:{name}", pretrained=False, img_size=32)
    mod = sys.modules[type(t.model).__module__]
    return t, mod


def test_cnn_map_tokens_match_forward_features(user_file):
    t = create_teacher(f"python:{user_file}:cnn", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    fmap = t.model.forward_features(x)  # (2, 8, 8, 8)
    out = t.forward_tokens(x)
    assert out.prefix is None and out.grid == (8, 8) and out.patches.shape == (2, 64, 8)
    assert torch.equal(out.patches[1, 3 * 8 + 5], fmap[1, :, 3, 5])  # row-major
    assert t.embed_dim == 8 and t.patch_size == 4 and t.num_prefix_tokens == 0
    assert t.dynamic_img_size and t.grid_size(48) == (12, 12) and t.grid_size() == (8, 8)
    assert t.mean == (0.485, 0.456, 0.406) and t.std == (0.229, 0.224, 0.225)


def test_feature_module_hook_captures_and_skips_the_head(user_file):
    t = create_teacher(f"python:{user_file}:cnn", feature_module="stem", factory_kwargs=dict(width=6), img_size=32)
    mod = sys.modules[type(t.model).__module__]
    x = torch.randn(2, 3, 32, 32)
    calls = mod.HEAD_CALLS[0]
    out = t.forward_tokens(x)
    assert mod.HEAD_CALLS[0] == calls + 1  # the model's forward ran ...
    stem = t.model.stem(x)  # (2, 4, 16, 16)
    assert out.grid == (16, 16) and t.embed_dim == 4 and t.patch_size == 2
    assert torch.equal(out.patches, stem.flatten(2).transpose(1, 2))
    assert not t.model.stem._forward_hooks  # hook removed after the call
    head_in = []
    t.model.head.register_forward_hook(lambda m, i, o: head_in.append(1))
    t.forward_tokens(x)
    assert head_in == []  # ... but stopped before the head
    assert t.model.layer2[0].weight.shape[0] == 6  # factory_kwargs reached the factory


def test_vit_tokens_with_prefix(user_file):
    t = create_teacher(f"python:{user_file}:vit", num_prefix_tokens=5, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.randn(2, 3, 32, 32)
    full = t.model.forward_features(x)  # (2, 5 + 16, 16)
    out = t.forward_tokens(x)
    assert out.prefix.shape == (2, 5, 16) and out.patches.shape == (2, 16, 16) and out.grid == (4, 4)
    assert torch.equal(torch.cat((out.prefix, out.patches), 1), full)
    assert t.patch_size == 8 and t.num_prefix_tokens == 5 and t.embed_dim == 16 and t.mean == (0.5,) * 3
    assert not t.dynamic_img_size  # a custom ViT's positions are fixed unless told otherwise
    with pytest.raises(TeacherError, match="32x32 inputs only"):
        t.forward_tokens(torch.randn(1, 3, 64, 64))


def test_vit_hooked_block_before_the_norm(user_file):
    t = create_teacher(f"python:{user_file}:vit", feature_module="blocks.1", num_prefix_tokens=5, patch_size=8,
                       img_size=32)
    m = t.model
    x = torch.randn(1, 3, 32, 32)
    out = t.forward_tokens(x)
    normed = m.forward_features(x)
    # the hooked tokens are the block's output: the final norm turns them into forward_features
    assert torch.allclose(m.norm(out.full()), normed, atol=1e-6)
    assert not torch.allclose(out.full(), normed, atol=1e-3)


def test_hook_driven_by_a_method_for_models_without_forward(user_file):
    t = create_teacher(f"python:{user_file}:no_forward", feature_module="blocks.0", num_prefix_tokens=5, img_size=32)
    assert t.reader.feature_method == "forward_features"
    m = t.model
    x = torch.randn(1, 3, 32, 32)
    tok = m.patch_embed(x).flatten(2).transpose(1, 2) + m.pos_embed
    tok = torch.cat((m.cls_token, tok), dim=1)
    assert torch.allclose(t.forward_tokens(x).full(), m.blocks[0](tok), atol=1e-6)


def test_nhwc_map_and_rectangular_inputs(user_file):
    t = create_teacher(f"python:{user_file}:vit", feature_method="forward_nhwc", map_format="NHWC", img_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    fmap = t.model.forward_nhwc(x)  # (1, 4, 6, 16)
    out = t.forward_tokens(x)
    assert out.grid == (4, 6) and t.patch_size == 8 and torch.equal(out.patches[0, 7], fmap[0, 1, 1])


def test_weights_loaded_strictly_and_safely(user_file, tmp_path):
    src, _ = _fresh(user_file, "cnn")
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        t = create_teacher(f"python:{user_file}:cnn", weights=str(tmp_path / f), img_size=32)
        assert all(torch.equal(a, sd[k]) for k, a in t.model.state_dict().items())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(t.forward_tokens(x).patches, src.forward_tokens(x).patches)

    # mismatch: missing key, wrong shape -> a clear error naming the key; strict=False loads the rest
    bad = dict(sd)
    bad.pop("head.bias")
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"missing \(1\): \['head.bias'\]"):
        create_teacher(f"python:{user_file}:cnn", weights=str(tmp_path / "missing.safetensors"), img_size=32)
    t = create_teacher(f"python:{user_file}:cnn", weights=str(tmp_path / "missing.safetensors"), strict=False,
                       img_size=32)
    assert torch.equal(t.model.head.weight, sd["head.weight"])
    with pytest.raises(WeightsError, match="head.weight: file"):
        create_teacher(f"python:{user_file}:cnn", weights=str(tmp_path / "w.safetensors"),
                       factory_kwargs=dict(width=6), img_size=32)
    with pytest.raises(WeightsError, match="not found"):
        create_teacher(f"python:{user_file}:cnn", weights=str(tmp_path / "nope.safetensors"), img_size=32)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(user_file, tmp_path):
    torch.save({"conv": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights_only"):
        create_teacher(f"python:{user_file}:cnn", weights=str(tmp_path / "evil.pt"), img_size=32)


def test_teacher_is_frozen(user_file):
    t = create_teacher(f"python:{user_file}:cnn", img_size=32)
    bn = t.model.stem[1]
    before = bn.running_mean.clone()
    t.train()
    out = t.forward_tokens(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not t.training and not t.model.training
    assert all(not p.requires_grad for p in t.parameters()) and not out.patches.requires_grad
    assert torch.equal(bn.running_mean, before)  # BatchNorm statistics untouched


def test_dotted_module_and_relative_path(user_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    t = create_teacher("python:user_models:vit", num_prefix_tokens=5, img_size=32)
    assert t.grid_size() == (4, 4)
    monkeypatch.chdir(tmp_path)
    t = create_teacher("python:./user_models.py:cnn", img_size=32)
    assert t.embed_dim == 8


def test_file_may_import_its_neighbours(tmp_path):
    (tmp_path / "blocks_lib.py").write_text("import torch.nn as nn\ndef make():\n    return nn.Conv2d(3, 5, 2, 2)\n")
    (tmp_path / "lazy_lib.py").write_text("import torch.nn as nn\ndef make():\n    return nn.Conv2d(3, 7, 4, 4)\n")
    (tmp_path / "net.py").write_text("import blocks_lib\ndef build():\n    return blocks_lib.make()\n"
                                     "def build_lazy():\n    import lazy_lib\n    return lazy_lib.make()\n")
    path_before = list(sys.path)
    t = create_teacher(f"python:{tmp_path / 'net.py'}:build", feature_method="forward", img_size=16)
    assert t.grid_size() == (8, 8) and t.embed_dim == 5
    t = create_teacher(f"python:{tmp_path / 'net.py'}:build_lazy", feature_method="forward", img_size=16)
    assert t.grid_size() == (4, 4) and t.embed_dim == 7
    assert sys.path == path_before


@pytest.mark.parametrize("kwargs, match", [
    (dict(spec="python:/nonexistent/dir/models.py:cnn"), "Python file not found"),
    (dict(spec="python:no_such_module_xyz:cnn"), "no module named 'no_such_module_xyz'"),
    (dict(spec="python:{f}:cnnn"), "has no 'cnnn'; did you mean 'cnn'"),
    (dict(spec="python:{f}:NOT_CALLABLE"), "not a callable"),
    (dict(spec="python:{f}:broken"), r"broken\(\*\*\{\}\) failed: ValueError: bad config"),
    (dict(spec="python:{f}:not_a_module"), "not a torch.nn.Module"),
    (dict(spec="python:{f}"), "must be python:<file.py or module>:<factory>"),
    (dict(spec="python:{f}:cnn", feature_method="forward_feature"), "no method 'forward_feature'; did you mean"),
    (dict(spec="python:{f}:cnn", feature_module="layer3"), "no submodule 'layer3'; did you mean 'layer2'"),
    (dict(spec="python:{f}:no_forward", feature_method="forward"), "does not implement forward"),
    (dict(spec="python:{f}:cnn", feature_module="head", feature_method="forward_features"),
     "did not run during model.forward_features"),
    (dict(spec="python:{f}:cnn", feature_method="forward"), r"returned shape \(1, 5\).*classifier's logits"),
    (dict(spec="python:{f}:vit", feature_method="as_dict"), "returned a dict with keys \\['tokens'\\]"),
    (dict(spec="python:{f}:cnn", map_format="NLC"), "map_format='NLC' but"),
    (dict(spec="python:{f}:cnn", map_format="NCWH"), "map_format must be one of"),
    (dict(spec="python:{f}:cnn", num_prefix_tokens=1), "spatial map .* without prefix tokens"),
    (dict(spec="python:{f}:vit", num_prefix_tokens=5, patch_size=16), "do not fill the 2x2 grid"),
    (dict(spec="python:{f}:vit", num_prefix_tokens=2), "cannot tell the grid of 19 patch tokens"),
])
def test_clear_errors(user_file, kwargs, match):
    kwargs = dict(kwargs)
    spec = kwargs.pop("spec").format(f=user_file)
    with pytest.raises(TeacherError, match=match):
        create_teacher(spec, img_size=32, **kwargs)


def test_import_error_in_user_file(tmp_path):
    (tmp_path / "buggy.py").write_text("import torch\nx = undefined_name\n")
    with pytest.raises(TeacherError, match="error while importing .*buggy.py: NameError"):
        create_teacher(f"python:{tmp_path / 'buggy.py'}:f")


def test_distills_into_a_student(user_file, tiny_student):
    from fdistill import FeatureDistiller

    teacher = create_teacher(f"python:{user_file}:cnn", img_size=32)
    student = tiny_student  # 32x32, patch 8 -> 4x4 grid; the teacher gives 8x8 at 32 -> resized to 16x16
    d = FeatureDistiller(teacher, student, cls_target="gap")
    assert d.align == "resize" and d.teacher_img_size == (16, 16)
    out = d(torch.rand(2, 3, 32, 32))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is None for p in teacher.parameters())


def test_a_model_of_another_native_size_gets_the_img_size_hint(tmp_path):
    """A CIFAR-size ViT probed at the default 224 px used to fail with a raw size mismatch inside the model."""
    from fdistill.teachers import TeacherError, create_teacher

    f = tmp_path / "vit32.py"
    f.write_text("import timm\n\ndef build():\n    return timm.create_model('vit_tiny_patch16_224', pretrained=False, "
                 "img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2)\n")
    with pytest.raises(TeacherError, match=r"224x224 probe image .*pass img_size=<that size>"):
        create_teacher(f"python:{f}:build")
    t = create_teacher(f"python:{f}:build", img_size=32, num_prefix_tokens=1)
    assert t.grid_size((32, 32)) == (8, 8)
