"""Evaluation suite: fine-tuning with layer-wise lr decay, linear probes, k-NN and zero-shot,
for any model fdistill loads (teachers, FD students, exports), side by side (paper Table 1).

Library functions take plain arguments; the commands in :mod:`fdistill.eval.commands` read the
configs of :mod:`fdistill.config.finetune` and write ``metrics.json``. See docs/evaluate.md.
"""
from .classifier import AdapterClassifier, Classifier, LoadedClassifier, beit_from_student, build_classifier, load_classifier
from .features import FeatureSet, extract_features
from .finetune import evaluate_classifier, finetune
from .knn import knn_classify, knn_scores, topk_accuracy
from .layer_decay import find_blocks, layer_ids, param_groups_layer_decay, set_drop_path
from .linear_probe import LinearProbeHead, linear_probe, linear_probe_sweep
from .zeroshot import load_templates, text_classifier, zero_shot, zero_shot_student

__all__ = [
    "finetune", "evaluate_classifier", "build_classifier", "beit_from_student", "Classifier", "AdapterClassifier",
    "load_classifier", "LoadedClassifier", "knn_scores", "knn_classify", "topk_accuracy", "extract_features",
    "FeatureSet", "linear_probe", "linear_probe_sweep", "LinearProbeHead", "zero_shot", "zero_shot_student",
    "text_classifier", "load_templates", "param_groups_layer_decay", "layer_ids", "find_blocks", "set_drop_path",
]
