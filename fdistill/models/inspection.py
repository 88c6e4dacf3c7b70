"""What a network is built of, read from its modules (no forward pass): the activation and
normalisation layer types that ``fdistill info`` reports and the teacher adapters check."""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict

import torch

_ACT = re.compile(r"gelu|relu|silu|swish|mish|hardswish|hardsigmoid|(^|[^a-z])elu|glu|activation", re.IGNORECASE)
_NORM = re.compile(r"norm", re.IGNORECASE)
_NOT_A_LAYER = re.compile(r"dropout|identity|droppath", re.IGNORECASE)


def layer_types(module: torch.nn.Module, kind: str) -> Dict[str, int]:
    """Class names of a model's activation (``kind="activation"``) or normalisation (``"norm"``)
    layers with how many of each, most frequent first (e.g. ``{'QuickGELU': 12}``,
    ``{'LayerNorm': 25}``). Activations are leaf modules whose class names say so (``GELU``,
    ``QuickGELU``, ``QuickGELUActivation``, ``SiLU``, ``ReLU``...): the MLPs' act layers of a ViT,
    the ReLUs of a CNN. Functional activations (``F.gelu`` called in ``forward``) are not modules
    and are not seen."""
    pattern = {"activation": _ACT, "norm": _NORM}[kind]
    found: Counter = Counter()
    for m in module.modules():
        name = type(m).__name__
        if _NOT_A_LAYER.search(name) or not pattern.search(name):
            continue
        if kind == "activation" and any(True for _ in m.children()):
            continue  # a block named ...Activation... holding layers is not itself one
        found[name] += 1
    return dict(found.most_common())
