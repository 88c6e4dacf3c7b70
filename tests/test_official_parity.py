"""Every shipped recipe resolves to the official FD configuration, value by value.

The tables below were transcribed once from SwinTransformer/Feature-Distillation (commit becd8b3):
each official value carries the file and key it came from. ``config.py`` holds the defaults the
YAML files inherit; ``main_fd.py`` / ``main_finetune.py``, ``data/data_fd.py``, ``optimizer.py``,
``lr_scheduler.py`` and ``models/`` hold what is not a config key. Each of our recipes is resolved
with ``build_config`` and compared to them; an intended difference is listed in ``DIFFERENCES``
with its reason, and the recipe must say so in a comment. Values the paper's text states
otherwise (the [CLS] weight, drop path) follow the code, and the recipe says which.
"""
import math
from pathlib import Path

import pytest
import torch

from fdistill.config import build_config
from fdistill.config.distill import DistillConfig, resolve_lr
from fdistill.config.finetune import FinetuneConfig
from fdistill.models.student import STUDENT_SIZES

CFG = "config.py"
PRE = "configs/pretrain/fd_pretrain__{}__img224__{}.yaml"
FT = "configs/finetune/fd_finetune__{}__img224__{}.yaml"

# -- config.py defaults used by the FD runs (official key: (value, where)) -------------------------
DEFAULTS = {
    "DATA.IMG_SIZE": (224, CFG), "DATA.BATCH_SIZE": (128, CFG), "DATA.INTERPOLATION": ("bicubic", CFG),
    "MODEL.VIT.PATCH_SIZE": (16, CFG), "MODEL.VIT.INIT_VALUES": (0.1, CFG), "MODEL.VIT.QKV_BIAS": (True, CFG),
    "MODEL.LABEL_SMOOTHING": (0.1, CFG), "TRAIN.OPTIMIZER.EPS": (1e-8, CFG),
    "TRAIN.OPTIMIZER.BETAS": ((0.9, 0.999), CFG), "TRAIN.CLIP_GRAD": (5.0, CFG),
    "TRAIN.ACCUMULATION_STEPS": (0, CFG), "TRAIN.LR_SCHEDULER.NAME": ("cosine", CFG),
    "AUG.COLOR_JITTER": (0.4, CFG), "AUG.AUTO_AUGMENT": ("rand-m9-mstd0.5-inc1", CFG), "AUG.REPROB": (0.25, CFG),
    "AUG.MIXUP": (0.8, CFG), "AUG.CUTMIX": (1.0, CFG), "AUG.MIXUP_PROB": (1.0, CFG),
    "AUG.MIXUP_SWITCH_PROB": (0.5, CFG), "AUG.MIXUP_MODE": ("batch", CFG),
    "AUG.MIN_SCALE": (0.67, CFG), "AUG.MAX_SCALE": (1.0, CFG), "TEST.CROP": (True, CFG), "SEED": (0, CFG),
    # not config keys: where they are fixed in code
    "lr_denominator": (512, "main_fd.py / main_finetune.py: BASE_LR * BATCH_SIZE * world_size / 512.0"),
    "ratio": ((3 / 4, 4 / 3), "data/data_fd.py: T.RandomResizedCrop(..., ratio=(3. / 4., 4. / 3.))"),
    "hflip": (0.5, "data/data_fd.py: T.RandomHorizontalFlip() (p=0.5)"),
    "fd_interpolation": ("bilinear", "data/data_fd.py: T.RandomResizedCrop default interpolation"),
    "loss_beta": (2.0, "models/feature_distillation.py: nn.SmoothL1Loss(beta=2.0)"),
    "target_norm": ("standardize", "models/feature_distillation.py: nn.LayerNorm(embed_dim, elementwise_affine=False)"),
    "cls_weight": (1.0, "models/feature_distillation.py: loss.mean() over every token"),
    "decay_rpb": (True, "optimizer.py: only 1-d, '.bias' and no_weight_decay() {'pos_embed', 'cls_token'} skip decay"),
    "init": ("official", "models/feature_distillation.py: _trunc_normal_(a=-std, b=std); vision_transformer.py"),
    "ema": (False, "main_finetune.py: no model EMA"),
    "warmup_prefix": (True, "lr_scheduler.py: CosineLRScheduler(t_initial=num_steps - warmup_steps, warmup_prefix=True)"),
    "precision": ("fp16", "main_fd.py / main_finetune.py: --enable-amp on by default, amp.GradScaler()"),
}

# -- the six pre-training configs (keys they set) ----------------------------------------------------
_VIT_PRE = {"MODEL.VIT.USE_SHARED_RPB": True, "MODEL.VIT.USE_APE": False, "MODEL.VIT.USE_RPB": False,
            "TRAIN.WARMUP_EPOCHS": 10, "TRAIN.BASE_LR": 3e-4, "TRAIN.WARMUP_LR": 5e-7, "TRAIN.MIN_LR": 5e-6,
            "TRAIN.WEIGHT_DECAY": 0.05, "TRAIN.CLIP_GRAD": 3.0, "DEV.PRED_FEAT_AFTERNORM": True,
            "DATA.IMG_SIZE": 224, "DATA.BATCH_SIZE": 128}
PRETRAIN = {
    "clip_vit_base_300ep": ("clip_vit_base", "300ep", dict(_VIT_PRE, **{
        "MODEL.DROP_PATH_RATE": 0.2, "MODEL.VIT.EMBED_DIM": 768, "MODEL.VIT.DEPTH": 12, "MODEL.VIT.NUM_HEADS": 12,
        "AUG.MIN_SCALE": 0.08, "TRAIN.EPOCHS": 300, "DEV.PRED_FEAT": "CLIP_400M"})),
    "clip_vit_base_100ep": ("clip_vit_base", "100ep", dict(_VIT_PRE, **{
        "MODEL.DROP_PATH_RATE": 0.1, "MODEL.VIT.EMBED_DIM": 768, "MODEL.VIT.DEPTH": 12, "MODEL.VIT.NUM_HEADS": 12,
        "TRAIN.EPOCHS": 100, "DEV.PRED_FEAT": "CLIP_400M"})),  # no AUG.MIN_SCALE: config.py's 0.67
    "clip_vit_large_300ep": ("clip_vit_large", "300ep", dict(_VIT_PRE, **{
        "MODEL.DROP_PATH_RATE": 0.3, "MODEL.VIT.EMBED_DIM": 1024, "MODEL.VIT.DEPTH": 24, "MODEL.VIT.NUM_HEADS": 16,
        "MODEL.VIT.PATCH_SIZE": 14, "AUG.MIN_SCALE": 0.08, "TRAIN.EPOCHS": 300, "DEV.PRED_FEAT": "CLIP_400M_Large"})),
    "dino_vit_base_300ep": ("dino_vit_base", "300ep", dict(_VIT_PRE, **{
        "MODEL.DROP_PATH_RATE": 0.3, "MODEL.VIT.EMBED_DIM": 768, "MODEL.VIT.DEPTH": 12, "MODEL.VIT.NUM_HEADS": 12,
        "AUG.MIN_SCALE": 0.08, "TRAIN.EPOCHS": 300, "DEV.PRED_FEAT": "DINO"})),
    "deit_vit_base_300ep": ("deit_vit_base", "300ep", dict(_VIT_PRE, **{
        "MODEL.DROP_PATH_RATE": 0.3, "MODEL.VIT.EMBED_DIM": 768, "MODEL.VIT.DEPTH": 12, "MODEL.VIT.NUM_HEADS": 12,
        "AUG.MIN_SCALE": 0.08, "TRAIN.EPOCHS": 300, "DEV.PRED_FEAT": "DEIT"})),
    "esvit_swin_base_300ep": ("esvit_swin_base", "300ep", {
        "MODEL.TYPE": "swin_v2", "MODEL.DROP_PATH_RATE": 0.3, "MODEL.SWIN.EMBED_DIM": 128,
        "MODEL.SWIN.DEPTHS": (2, 2, 18, 2), "MODEL.SWIN.NUM_HEADS": (4, 8, 16, 32), "MODEL.SWIN.WINDOW_SIZE": 14,
        "DATA.IMG_SIZE": 224, "DATA.BATCH_SIZE": 128, "AUG.MIN_SCALE": 0.08, "TRAIN.EPOCHS": 300,
        "TRAIN.WARMUP_EPOCHS": 10, "TRAIN.BASE_LR": 2e-4, "TRAIN.WARMUP_LR": 1e-6, "TRAIN.MIN_LR": 1e-5,
        "TRAIN.WEIGHT_DECAY": 0.05, "TRAIN.CLIP_GRAD": 3.0, "DEV.PRED_FEAT": "ESVIT", "DEV.PRED_FEAT_AFTERNORM": True}),
}
#: models/feature_distillation.py: which network DEV.PRED_FEAT loads -> the teacher spec that is that network
TEACHERS = {
    "CLIP_400M": "timm:vit_base_patch16_clip_quickgelu_224.openai",         # load_clip("ViT-B/16"), QuickGELU
    "CLIP_400M_Large": "timm:vit_large_patch14_clip_quickgelu_224.openai",  # load_clip("ViT-L/14")
    "DINO": "timm:vit_base_patch16_224.dino",                               # models/dino.py
    "DEIT": "timm:deit_base_patch16_224.fb_in1k",                           # models/deit.py
    "ESVIT": "timm:swin_base_patch4_window7_224",                           # models/esvit.py, window 14, user's file
}

# -- the six fine-tuning configs -----------------------------------------------------------------------
_FT = {"MODEL.VIT.USE_MEAN_POOLING": True, "DATA.IMG_SIZE": 224, "DATA.BATCH_SIZE": 128, "TRAIN.EPOCHS": 100,
       "TRAIN.WARMUP_EPOCHS": 20, "TRAIN.WARMUP_LR": 2.5e-7, "TRAIN.MIN_LR": 2.5e-7, "TRAIN.WEIGHT_DECAY": 0.05}
FINETUNE = {
    "vit_base": (FT.format("clip_vit_base", "300ep"), dict(_FT, **{
        "MODEL.DROP_PATH_RATE": 0.3, "TRAIN.BASE_LR": 1.25e-3, "TRAIN.LAYER_DECAY": 0.6})),
    "vit_base_clip_100ep": (FT.format("clip_vit_base", "100ep"), dict(_FT, **{
        "MODEL.DROP_PATH_RATE": 0.1, "TRAIN.BASE_LR": 1.25e-3, "TRAIN.LAYER_DECAY": 0.65})),
    "vit_large": (FT.format("clip_vit_large", "300ep"), dict(_FT, **{
        "MODEL.DROP_PATH_RATE": 0.4, "TRAIN.EPOCHS": 50, "TRAIN.WARMUP_EPOCHS": 5, "TRAIN.BASE_LR": 2.5e-4,
        "TRAIN.WARMUP_LR": 5e-7, "TRAIN.MIN_LR": 5e-7, "TRAIN.LAYER_DECAY": 0.75})),
    "vit_base_dino": (FT.format("dino_vit_base", "300ep"), dict(_FT, **{
        "MODEL.DROP_PATH_RATE": 0.2, "TRAIN.BASE_LR": 1.5e-3, "TRAIN.LAYER_DECAY": 0.6})),
    "vit_base_deit": (FT.format("deit_vit_base", "300ep"), dict(_FT, **{
        "MODEL.DROP_PATH_RATE": 0.3, "TRAIN.BASE_LR": 1.25e-3, "TRAIN.LAYER_DECAY": 0.65})),
    "swinv2_base_esvit": (FT.format("esvit_swin_base", "300ep"), dict(_FT, **{
        "MODEL.DROP_PATH_RATE": 0.4, "DATA.BATCH_SIZE": 64, "TRAIN.BASE_LR": 1.25e-3, "TRAIN.LAYER_DECAY": 0.8})),
}

#: intended differences: (recipe key, official value, ours, reason); each recipe says so in a comment
DIFFERENCES = {
    "precision": ("train.precision / precision", "fp16 + GradScaler", "auto (bf16 on GPUs that have it)",
                  "bf16 needs no loss scaling and is the better default on current GPUs; train.precision=fp16 "
                  "runs the official scaler path (tests/test_engine_step.py)"),
    "ft_normalisation": ("(fine-tuning data)", "train ImageNet mean/std, val CLIP mean/std", "each model's own",
                         "the official validation transform normalises with other statistics than training"),
    "schedule_step": ("(engine)", "update k uses the lr of index k-1 (step_update after optimizer.step)",
                      "update k uses the lr of index k", "a one-update shift of the same schedule"),
}


def official(values: dict, key: str):
    return values[key] if key in values else DEFAULTS[key][0]


def _comment_lines(path):
    return "\n".join(line for line in Path(path).read_text().splitlines() if "#" in line)


@pytest.mark.parametrize("recipe", sorted(PRETRAIN))
def test_pretraining_recipe_is_the_official_config(recipe):
    model, epochs, off = PRETRAIN[recipe]
    c = build_config(DistillConfig, f"configs/distill/{recipe}.yaml")
    got = {
        "drop path": c.student.drop_path_rate, "epochs": c.train.epochs, "warm-up epochs": c.optim.warmup_epochs,
        "base lr": c.optim.base_lr, "warm-up lr": c.optim.warmup_lr, "min lr": c.optim.min_lr,
        "weight decay": c.optim.weight_decay, "clip grad": c.optim.clip_grad, "eps": c.optim.eps,
        "betas": tuple(c.optim.betas), "lr denominator": c.optim.lr_batch_denominator,
        "accumulation": c.optim.accum_steps, "batch": c.data.batch_size, "scale": tuple(c.data.scale),
        "hflip": c.data.hflip, "interpolation": c.data.interpolation, "img size": c.student.img_size,
        "after norm": c.teacher.after_norm, "teacher": c.teacher.spec, "beta": c.distill.beta,
        "target norm": c.distill.norm, "cls weight": c.distill.cls_weight, "granularity": c.distill.granularity,
        "mask ratio": c.distill.mask_ratio, "decay rpb": c.optim.decay_rel_pos_bias, "seed": c.train.seed,
    }
    want = {
        "drop path": off["MODEL.DROP_PATH_RATE"], "epochs": off["TRAIN.EPOCHS"],
        "warm-up epochs": off["TRAIN.WARMUP_EPOCHS"], "base lr": off["TRAIN.BASE_LR"],
        "warm-up lr": off["TRAIN.WARMUP_LR"], "min lr": off["TRAIN.MIN_LR"], "weight decay": off["TRAIN.WEIGHT_DECAY"],
        "clip grad": official(off, "TRAIN.CLIP_GRAD"), "eps": official(off, "TRAIN.OPTIMIZER.EPS"),
        "betas": official(off, "TRAIN.OPTIMIZER.BETAS"), "lr denominator": DEFAULTS["lr_denominator"][0],
        "accumulation": max(1, official(off, "TRAIN.ACCUMULATION_STEPS")), "batch": off["DATA.BATCH_SIZE"],
        "scale": (official(off, "AUG.MIN_SCALE"), official(off, "AUG.MAX_SCALE")), "hflip": DEFAULTS["hflip"][0],
        "interpolation": DEFAULTS["fd_interpolation"][0], "img size": off["DATA.IMG_SIZE"],
        "after norm": off["DEV.PRED_FEAT_AFTERNORM"], "teacher": TEACHERS[off["DEV.PRED_FEAT"]],
        "beta": DEFAULTS["loss_beta"][0], "target norm": DEFAULTS["target_norm"][0],
        "cls weight": DEFAULTS["cls_weight"][0], "granularity": "full", "mask ratio": 0.0,
        "decay rpb": DEFAULTS["decay_rpb"][0], "seed": DEFAULTS["SEED"][0],
    }
    assert {k: got[k] for k in want} == _approx(want)
    assert c.data.ratio == pytest.approx(DEFAULTS["ratio"][0], rel=1e-6)
    assert c.data.img_size in (None, off["DATA.IMG_SIZE"])
    if off.get("MODEL.TYPE") == "swin_v2":
        import timm

        assert c.teacher.kwargs["window_size"] == 14  # EsViT Swin-B/w14
        with torch.device("meta"):
            m = timm.create_model(c.student.arch[5:], pretrained=False, img_size=c.student.img_size,
                                  **c.student.kwargs)
        assert m.embed_dim == off["MODEL.SWIN.EMBED_DIM"]
        assert tuple(len(s.blocks) for s in m.layers) == off["MODEL.SWIN.DEPTHS"]
        assert tuple(s.blocks[0].attn.num_heads for s in m.layers) == off["MODEL.SWIN.NUM_HEADS"]
        assert m.layers[0].blocks[0].window_size == (off["MODEL.SWIN.WINDOW_SIZE"],) * 2
    else:
        assert c.student.pos_embed == "shared_rpb" and off["MODEL.VIT.USE_SHARED_RPB"]
        assert not off["MODEL.VIT.USE_APE"] and not off["MODEL.VIT.USE_RPB"]
        assert STUDENT_SIZES[c.student.arch] == (off["MODEL.VIT.EMBED_DIM"], off["MODEL.VIT.DEPTH"],
                                                 off["MODEL.VIT.NUM_HEADS"])
        assert c.student.embed_dim in (None, off["MODEL.VIT.EMBED_DIM"]) and c.student.depth in (None, off["MODEL.VIT.DEPTH"])
        assert c.student.patch_size == official(off, "MODEL.VIT.PATCH_SIZE")
        assert c.student.init_values == official(off, "MODEL.VIT.INIT_VALUES")
        assert c.student.init == DEFAULTS["init"][0]
    # the official linear scaling rule: 16 GPUs x 128 -> peak = base x 2048 / 512, warm-up and floor alike
    peak, wu, lo = resolve_lr(c.optim, 2048)
    assert (peak, wu, lo) == pytest.approx((off["TRAIN.BASE_LR"] * 4, off["TRAIN.WARMUP_LR"] * 4, off["TRAIN.MIN_LR"] * 4))
    _assert_recipe_says_what_differs(f"configs/distill/{recipe}.yaml", c)


def _approx(d):
    return {k: (pytest.approx(v) if isinstance(v, (float, tuple)) else v) for k, v in d.items()}


def _assert_recipe_says_what_differs(path, cfg):
    """An intended difference is written in the recipe itself (here or in its _base_)."""
    text = _comment_lines(path)
    base = Path(path).read_text().split("_base_:", 1)
    if len(base) == 2:
        text += _comment_lines(Path(path).parent / base[1].split()[0])
    assert "differs:" in text and "fp16" in text, f"{path} must say that its precision differs from the official fp16"
    if isinstance(cfg, DistillConfig):
        assert "paper: [CLS] x10" in text  # the paper's text vs the code's loss.mean()
        assert "paper: 0.1" in text        # the paper's drop path vs the configs'


@pytest.mark.parametrize("recipe", sorted(FINETUNE))
def test_finetuning_recipe_is_the_official_config(recipe):
    src, off = FINETUNE[recipe]
    c = build_config(FinetuneConfig, f"configs/finetune/{recipe}.yaml")
    got = {
        "drop path": c.model.drop_path, "pool": c.model.global_pool, "img size": c.data.img_size,
        "batch": c.data.batch_size, "epochs": c.epochs, "warm-up epochs": c.warmup_epochs,
        "base lr": c.optim.base_lr, "warm-up lr": c.optim.warmup_lr, "min lr": c.optim.min_lr,
        "weight decay": c.optim.weight_decay, "layer decay": c.optim.layer_decay, "clip grad": c.optim.clip_grad,
        "eps": c.optim.eps, "betas": tuple(c.optim.betas), "lr denominator": c.optim.lr_batch_denominator,
        "interpolation": c.data.interpolation, "crop pct": c.data.crop_pct, "auto augment": c.aug.auto_augment,
        "colour jitter": c.aug.color_jitter, "random erasing": c.aug.re_prob, "mixup": c.aug.mixup,
        "cutmix": c.aug.cutmix, "mixup prob": c.aug.mixup_prob, "switch prob": c.aug.mixup_switch_prob,
        "mixup mode": c.aug.mixup_mode, "label smoothing": c.aug.label_smoothing, "scale": tuple(c.aug.scale),
        "ema": c.ema.enabled, "decay rpb": c.optim.decay_rel_pos_bias, "seed": c.seed,
    }
    want = {
        "drop path": off["MODEL.DROP_PATH_RATE"], "pool": "avg" if off["MODEL.VIT.USE_MEAN_POOLING"] else "token",
        "img size": off["DATA.IMG_SIZE"], "batch": off["DATA.BATCH_SIZE"], "epochs": off["TRAIN.EPOCHS"],
        "warm-up epochs": off["TRAIN.WARMUP_EPOCHS"], "base lr": off["TRAIN.BASE_LR"],
        "warm-up lr": off["TRAIN.WARMUP_LR"], "min lr": off["TRAIN.MIN_LR"], "weight decay": off["TRAIN.WEIGHT_DECAY"],
        "layer decay": off["TRAIN.LAYER_DECAY"], "clip grad": DEFAULTS["TRAIN.CLIP_GRAD"][0],
        "eps": DEFAULTS["TRAIN.OPTIMIZER.EPS"][0], "betas": DEFAULTS["TRAIN.OPTIMIZER.BETAS"][0],
        "lr denominator": DEFAULTS["lr_denominator"][0], "interpolation": DEFAULTS["DATA.INTERPOLATION"][0],
        "crop pct": 224 / 256 if DEFAULTS["TEST.CROP"][0] else 1.0,  # Resize(int(256 / 224 * 224)) + CenterCrop
        "auto augment": DEFAULTS["AUG.AUTO_AUGMENT"][0], "colour jitter": DEFAULTS["AUG.COLOR_JITTER"][0],
        "random erasing": DEFAULTS["AUG.REPROB"][0], "mixup": DEFAULTS["AUG.MIXUP"][0],
        "cutmix": DEFAULTS["AUG.CUTMIX"][0], "mixup prob": DEFAULTS["AUG.MIXUP_PROB"][0],
        "switch prob": DEFAULTS["AUG.MIXUP_SWITCH_PROB"][0], "mixup mode": DEFAULTS["AUG.MIXUP_MODE"][0],
        "label smoothing": DEFAULTS["MODEL.LABEL_SMOOTHING"][0],
        "scale": (0.08, 1.0),  # data_finetune.py: timm create_transform's default scale, not AUG.MIN_SCALE
        "ema": DEFAULTS["ema"][0], "decay rpb": DEFAULTS["decay_rpb"][0], "seed": DEFAULTS["SEED"][0],
    }
    assert {k: got[k] for k in want} == _approx(want)
    _assert_recipe_says_what_differs(f"configs/finetune/{recipe}.yaml", c)


def test_the_mae_recipe_is_the_clip_recipe_with_its_own_teacher():
    """MAE has no official FD config (it is our MIM control): the CLIP ViT-B/16 300-epoch recipe with
    the MAE encoder as teacher and the DINO/DeiT rows' drop path."""
    mae = build_config(DistillConfig, "configs/distill/mae_vit_base_300ep.yaml")
    clip = build_config(DistillConfig, "configs/distill/clip_vit_base_300ep.yaml")
    assert mae.teacher.spec == "timm:vit_base_patch16_224.mae" and mae.student.drop_path_rate == 0.3
    assert (mae.optim, mae.data, mae.distill) == (clip.optim, clip.data, clip.distill)


def test_the_differences_table_names_a_reason_for_each():
    assert all(len(v) == 4 and len(v[3]) > 20 for v in DIFFERENCES.values())
    assert math.isclose(DEFAULTS["ratio"][0][1], 4 / 3)
