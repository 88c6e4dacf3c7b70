"""``fdistill export``: a distilled student out of a run, for fine-tuning elsewhere.

Two formats:

``timm``
    A folder timm loads by itself -- ``config.json`` (architecture, the model arguments that
    rebuild the student, its input mean/std) and ``model.safetensors`` -- written with timm's
    own :func:`~timm.models.save_for_hf`::

        model = timm.create_model("local-dir:/path/to/export", pretrained=True)

    An FD ViT student is a timm BEiT (``beit_base_patch16_224`` with the student's widths,
    shared relative position bias and layer scale); its mask token, used only during
    distillation, is left out. A ``timm:`` student (e.g. Swin) is saved as the timm model it is.
    After writing, the export is loaded back through timm and its ``forward_features`` compared
    with the student's: an export that does not reproduce the student is never left behind.

``safetensors``
    ``student.safetensors`` (every student weight, mask token included), ``projector.safetensors``
    (the FD projector, for student-side zero-shot and diagnostics) and ``fdistill_export.json``
    (the ``create_student`` arguments, the teacher's spec, the step and source checkpoint).

The licence travels with the weights: a student is trained to reproduce its teacher's features, so
its weights are derived from the teacher's. Both formats record the teacher's provenance (spec,
weights, licence; see :func:`fdistill.teachers.provenance.make_provenance`) in ``fdistill_export.json``
(``teacher.provenance``), the timm format also in ``config.json`` (root ``teacher``, and
``pretrained_cfg.license`` / ``notes``), and write a ``MODEL_CARD.md`` saying which teacher
weights the student derives from and under which licence. A non-commercial teacher licence
(``cc-by-nc-*``, "non-commercial") is logged as a warning: the student inherits it. Checkpoints
written before fdistill recorded provenance export with licence "unknown".
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .checkpoint import CKPT_DIR, latest_valid_checkpoint, load_checkpoint
from .errors import RunError

log = logging.getLogger(__name__)

FORMATS = ("timm", "safetensors")
_MARKERS = ("config.json", "fdistill_export.json")
MODEL_CARD = "MODEL_CARD.md"
#: license_source of a checkpoint written before fdistill recorded the teacher's provenance
NOT_RECORDED = "not recorded (checkpoint written before fdistill recorded teacher provenance)"


def teacher_provenance(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher provenance of a checkpoint dict: ``{"spec", "weights", "license",
    "license_source"}``; an older checkpoint without one gives ``weights``/``license`` "unknown"."""
    teacher = ckpt.get("teacher") or {}
    prov = teacher.get("provenance")
    spec = teacher.get("spec") or (ckpt.get("config") or {}).get("teacher", {}).get("spec") or "unknown"
    if not isinstance(prov, dict):
        return {"spec": spec, "weights": "unknown", "license": "unknown", "license_source": NOT_RECORDED}
    return {"spec": prov.get("spec") or spec, "weights": prov.get("weights"),
            "license": prov.get("license") or "unknown", "license_source": prov.get("license_source")}


def licence_notice(prov: Dict[str, Any]) -> str:
    """One sentence: what the student's weights derive from and under which licence."""
    from ..teachers.provenance import RANDOM_INIT_LICENSE

    if prov.get("license") == RANDOM_INIT_LICENSE:
        return (f"The teacher {prov['spec']} was randomly initialised (no pre-trained weights), so no teacher "
                "licence applies to this student.")
    weights = prov.get("weights") or "unknown"
    return (f"These weights are derived, by feature distillation, from the weights '{weights}' of the teacher "
            f"{prov['spec']}, licensed {prov.get('license') or 'unknown'}; the student inherits that licence.")


def non_commercial_warning(prov: Dict[str, Any]) -> Optional[str]:
    """A warning text when the teacher's licence is non-commercial, else ``None``."""
    from ..teachers.provenance import is_non_commercial

    if not is_non_commercial(prov.get("license")):
        return None
    return (f"the teacher {prov['spec']} (weights '{prov.get('weights')}') is licensed {prov['license']}, a "
            "NON-COMMERCIAL licence: the exported student is derived from those weights and inherits it; do not "
            "use it commercially")


def _card_license_fields(license: str) -> str:
    """YAML front matter ``license:`` lines (Hugging Face style): an id as is, anything else as other."""
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license or ""):
        return f"license: {license}\n"
    return f"license: other\nlicense_name: {json.dumps(str(license))}\n"


def write_model_card(folder: Path, info: Dict[str, Any], *, format: str) -> Path:
    """``MODEL_CARD.md``: where the weights come from and the licence they inherit."""
    prov = info["teacher"]["provenance"]
    warn = non_commercial_warning(prov)
    args = info.get("student_args", {})
    arch = args.get("arch", "vit") if isinstance(args, dict) else "vit"
    load = ("    import timm\n    model = timm.create_model('local-dir:<this folder>', pretrained=True)\n"
            if format == "timm" else
            "    from fdistill.models.loading import load_model\n    model = load_model('<this folder>')\n")
    lines = [
        "---", _card_license_fields(prov.get("license") or "unknown").rstrip("\n"),
        "tags: [fdistill, feature-distillation]", "---", "",
        f"# Feature-distilled student ({arch}) of {prov['spec']}", "",
        "## Licence", "", licence_notice(prov), "",
        f"- teacher: `{prov['spec']}`",
        f"- teacher weights: `{prov.get('weights')}`",
        f"- teacher licence: `{prov.get('license')}`"
        + (f" (source: {prov['license_source']})" if prov.get("license_source") else ""), "",
    ]
    if warn:
        lines += [f"**Warning:** {warn}.", ""]
    lines += [
        "## Provenance", "",
        f"Distilled with fdistill (Feature Distillation, Wei et al. 2023): step {info.get('step')} of the run "
        f"checkpoint `{Path(str(info.get('source_checkpoint', ''))).name}`; input {info.get('img_size')} px, "
        f"mean {info.get('mean')}, std {info.get('std')}.", "",
        "## Use", "", load,
    ]
    path = folder / MODEL_CARD
    path.write_text("\n".join(lines))
    return path


def resolve_checkpoint(run_or_ckpt: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest valid checkpoint of a run folder."""
    p = Path(run_or_ckpt).expanduser()
    if p.is_dir():
        found = latest_valid_checkpoint(p, task="distill")
        if found is None:
            raise RunError(f"{p} holds no valid checkpoint (looked in {p / CKPT_DIR})")
        return found
    if not p.is_file():
        raise RunError(f"no run folder or checkpoint at {p}")
    return p


def rebuild_student(ckpt: Dict[str, Any]) -> torch.nn.Module:
    """The student of a checkpoint dict, weights loaded, in eval mode (drop path off)."""
    from ..weights import WeightsError, load_into

    args = dict(ckpt["student_args"])
    args["drop_path_rate"] = 0.0
    args["grad_checkpointing"] = False
    if str(args.get("arch", "")).startswith("timm:"):
        from ..models.timm_student import create_timm_student

        arch = args.pop("arch")[5:]
        student = create_timm_student(arch, **{**args.pop("kwargs", {}), **args})
    else:
        from ..models.student import create_student

        student = create_student(**args)
    try:
        load_into(student, ckpt["model"]["student"], what="student")
    except WeightsError as e:
        raise RunError(f"checkpoint student weights do not fit its own student_args: {e}") from e
    return student.eval()


def _timm_model_of(student: torch.nn.Module) -> torch.nn.Module:
    """The plain timm model equal to ``student`` (FD ViT -> BEiT without the mask token)."""
    import timm

    if hasattr(student, "timm_model"):  # a timm: student wraps one
        return student.timm_model()
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **student.timm_model_args())
    sd = {k: v for k, v in student.state_dict().items() if k != "mask_token"}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; an older export there is replaced."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not any((out / m).exists() for m in _MARKERS)):
            raise RunError(f"{out} exists and is not an fdistill/timm export: choose another --output")
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_student(run_or_ckpt: str | os.PathLike, *, format: str = "timm", output: Optional[str | os.PathLike] = None,
                   verify: bool = True) -> Path:
    """Write the student of a run (its newest valid checkpoint) or of a checkpoint file.

    Args:
        run_or_ckpt: a run folder or a ``ckpt_*.pt`` file.
        format: ``timm`` or ``safetensors`` (see module docstring).
        output: the folder to write (default ``<run>/export_<format>``); an older export there is
            replaced, anything else is refused.
        verify: (``timm``) reload the export with timm and check its features equal the student's.

    Returns the export folder.
    """
    if format not in FORMATS:
        raise RunError(f"unknown export format {format!r}; expected one of {FORMATS}")
    ckpt_path = resolve_checkpoint(run_or_ckpt)
    ckpt = load_checkpoint(ckpt_path, task="distill")
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == CKPT_DIR else ckpt_path.parent
    out = Path(output).expanduser() if output else run_dir / f"export_{format}"
    student = rebuild_student(ckpt)
    bad = [n for n, t in student.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise RunError(f"{ckpt_path}: {len(bad)} student tensors hold NaN/inf values (e.g. {bad[:3]}); refusing to "
                       "export them. Resume from an earlier checkpoint or lower the learning rate")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    prov = teacher_provenance(ckpt)
    info = {
        "format": "fdistill-student", "student_args": ckpt["student_args"],
        "teacher": {**(ckpt.get("teacher") or {}), "provenance": prov},
        "step": int(ckpt["progress"]["step"]), "source_checkpoint": str(ckpt_path.resolve()),
        "mean": list(student.mean), "std": list(student.std), "img_size": list(student.img_size),
        "grid_size": list(student.grid_size),
    }
    try:
        if format == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp / "student.safetensors"))
            if "projector" in ckpt["model"]:
                save_file({k: v.contiguous() for k, v in ckpt["model"]["projector"].items()},
                          str(tmp / "projector.safetensors"))
            (tmp / "fdistill_export.json").write_text(json.dumps(info, indent=2))
            write_model_card(tmp, info, format=format)
        else:
            from timm.models import save_for_hf

            model = _timm_model_of(student)
            h, w = student.img_size
            # the tag/license of the architecture's default config would describe someone else's weights;
            # the student's weights derive from the teacher's and inherit their licence
            meta = {"pretrained_cfg": {"tag": "fdistill", "license": prov["license"], "notes": [licence_notice(prov)],
                                       "description": f"feature-distilled student of {prov['spec']}"},
                    "teacher": prov}
            save_for_hf(model, str(tmp), model_config=meta, safe_serialization=True,
                        data_config={"mean": tuple(student.mean), "std": tuple(student.std), "input_size": (3, h, w)})
            if (ckpt.get("teacher") or {}).get("teachers"):  # a multi-teacher run: its heads ride along
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in ckpt["model"]["projector"].items()},
                          str(tmp / "heads.safetensors"))
            (tmp / "fdistill_export.json").write_text(json.dumps(info, indent=2))
            write_model_card(tmp, info, format=format)
            if verify:
                verify_timm_export(tmp, student)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warn = non_commercial_warning(prov)
    if warn:
        log.warning("fdistill export: %s (see %s)", warn, out / MODEL_CARD)
    return out


@torch.no_grad()
def verify_timm_export(folder: str | os.PathLike, student: torch.nn.Module, atol: float = 1e-5) -> None:
    """Load ``folder`` with ``timm.create_model('local-dir:...')`` and check that its
    ``forward_features`` equals the student's token map on random images."""
    import timm

    model = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *student.img_size, generator=g)
    ref = student.timm_model().forward_features(x) if hasattr(student, "timm_model") else student.forward_tokens(x)
    got = model.forward_features(x)
    if got.shape != ref.shape or not torch.allclose(got, ref, atol=atol, rtol=1e-4):
        err = (got - ref).abs().max().item() if got.shape == ref.shape else f"shape {tuple(got.shape)} vs {tuple(ref.shape)}"
        raise RunError(f"the timm export in {folder} does not reproduce the student's features (max diff {err})")
