"""The projector g of the paper (Sec. 3.1): a per-token linear map from the student's width to
the teacher's, the official code's ``nn.Conv1d(C_s, C_t, kernel_size=1)``."""
from __future__ import annotations

import torch
import torch.nn as nn


class TokenProjector(nn.Linear):
    """(B, T, C_student) -> (B, T, C_teacher). ``nn.Linear`` on the last dim equals a 1x1 conv
    over tokens and keeps the same default initialisation."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)
