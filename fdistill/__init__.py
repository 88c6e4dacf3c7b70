"""fdistill: Feature Distillation (Wei et al., "Improving CLIP Fine-tuning Performance",
ICCV 2023; arXiv 2205.14141) as a library and a command-line tool.

Public API::

    import fdistill
    teacher = fdistill.create_teacher("timm:vit_base_patch16_clip_quickgelu_224.openai")
    student = fdistill.create_student("vit_base", patch_size=16, img_size=224)
    distiller = fdistill.FeatureDistiller(teacher, student)      # paper defaults
    out = distiller(images)        # images (B, 3, H, W) in [0, 1]; out["loss"].backward()

    model = fdistill.load_model("runs/fd")   # any model: a teacher spec, a run, an export -> Backbone
    tokens = model.forward_features(model.normalize(images))   # (B, P+N, C)
"""
from .backbone import Backbone
from .distiller import FeatureDistiller
from .losses import feature_distill_loss
from .models import create_student
from .models.loading import load_model
from .teachers import create_teacher

__version__ = "0.1.0"
__all__ = ["create_teacher", "create_student", "load_model", "Backbone", "FeatureDistiller", "feature_distill_loss",
           "__version__"]
