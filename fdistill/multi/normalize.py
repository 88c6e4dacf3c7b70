"""Per-teacher target normalisers for multi-teacher feature distillation.

Each frozen teacher's token map (B, N, C) is normalised before a student head regresses it, so
that teachers whose features live on very different scales contribute comparable losses:

* ``standardize`` (:class:`TokenStandardize`): per-token LayerNorm without affine, FD's target
  "whitening" (Wei et al., "Improving CLIP Fine-tuning Performance", ICCV 2023, arXiv
  2205.14141, Sec. 3.1). No statistics needed; not invertible.
* ``stats`` (:class:`ChannelStats`): per-channel mean / std of that teacher's features over a
  fitting set (UNIC, Sariyildiz et al., ECCV 2024, arXiv 2408.05088; Theia, Shang et al., CoRL
  2024, arXiv 2407.20179). Invertible.
* ``phi_s`` (:class:`PhiS`): PHI-S, the Hadamard-rotated isotropic standardisation of RADIO
  (Ranzinger et al., "PHI-S: Distribution Balancing for Label-Free Multi-Source Learning",
  arXiv 2410.01680). Invertible.
* ``l2`` (:class:`L2Norm`): unit L2 norm per token. ``none`` (:class:`NoNorm`): identity.

The fitted normalisers learn their statistics from a :class:`FeatureStats` (a streaming float64
accumulator, summed across ranks with :meth:`FeatureStats.all_reduce_`) and keep them as
float32 buffers, with a persistent ``fitted`` flag, so a checkpoint's ``state_dict()``
restores them bit-exactly on resume::

    stats = FeatureStats(C)
    for images in loader:                                  # a few hundred images
        stats.update(teacher(images))                      # (B, N, C): every token a sample
    stats.all_reduce_(env)                                 # same statistics on every rank
    norm = build_target_norm("phi_s", C).fit(stats)
    target = norm(teacher(images))                         # (B, N, C) float32
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TARGET_NORMS", "FeatureStats", "TargetNorm", "TokenStandardize", "ChannelStats", "PhiS",
    "L2Norm", "NoNorm", "build_target_norm", "hadamard",
]

TARGET_NORMS = ("standardize", "stats", "phi_s", "l2", "none")


# ----------------------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------------------
class FeatureStats:
    """Streaming first and second moments of C-dim features, in float64.

    ``update(x)`` takes x of shape (..., C) and counts every leading position (every token of
    every image) as one sample. Kept: ``count``, ``sum`` (C,) and ``sum_outer`` (C, C) =
    sum_i x_i x_i^T; these are plain sums, so ranks combine by summing (:meth:`all_reduce_`).
    The accumulators live on ``device`` (default: the device of the first update, so GPU
    features are accumulated on the GPU without a copy per batch).
    """

    def __init__(self, dim: int, device: Optional[torch.device | str] = None):
        if int(dim) < 1:
            raise ValueError(f"FeatureStats: dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self._device = None if device is None else torch.device(device)
        self.sum: Optional[torch.Tensor] = None  # (C,) float64
        self.sum_outer: Optional[torch.Tensor] = None  # (C, C) float64
        if self._device is not None:
            self._alloc(self._device)

    def _alloc(self, device: torch.device) -> None:
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "FeatureStats":
        """Add the samples of x (..., C); refuses NaN / Inf (a ``ValueError``, nothing added)."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"FeatureStats(dim={self.dim}).update: expected (..., {self.dim}) "
                             f"features, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.dim)  # (M, C)
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"FeatureStats.update: the features hold {bad} non-finite value(s) "
                             f"(NaN/Inf) out of {x.numel()}; check the teacher's precision "
                             "(fp16 overflow?) and its inputs")
        if self.sum is None:
            self._alloc(x.device)
        x = x.to(device=self.sum.device, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x  # (C, C)
        return self

    def _check(self, what: str) -> None:
        if self.count == 0:
            raise ValueError(f"FeatureStats.{what}: no samples yet; call update() on some features first")

    def mean(self) -> torch.Tensor:
        """(C,) float64 mean."""
        self._check("mean()")
        return self.sum / self.count

    def cov(self) -> torch.Tensor:
        """(C, C) float64 population covariance (divided by ``count``): E[x x^T] - mu mu^T."""
        self._check("cov()")
        mu = self.mean()
        c = self.sum_outer / self.count - torch.outer(mu, mu)
        return 0.5 * (c + c.T)  # exactly symmetric

    @torch.no_grad()
    def all_reduce_(self, env) -> "FeatureStats":
        """Sum ``count``, ``sum`` and ``sum_outer`` over the ranks of ``env`` (a
        :class:`fdistill.engine.distributed.DistEnv`), in one message; a no-op on one process.

        Every rank must call it (a collective); a rank that saw no samples contributes zeros."""
        if not env.distributed:
            return self
        if self.sum is None:
            self._alloc(torch.device("cpu"))
        home = self.sum.device
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=home),
                            self.sum, self.sum_outer.reshape(-1)])  # (1 + C + C*C,)
        packed = packed.to(env.device)  # NCCL needs the rank's GPU, gloo the CPU
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed = packed.to(home)
        C = self.dim
        self.count = int(round(float(packed[0])))
        self.sum.copy_(packed[1:1 + C])
        self.sum_outer.copy_(packed[1 + C:].reshape(C, C))
        return self

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"


# ----------------------------------------------------------------------------------------------
# Hadamard matrices
# ----------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, int(math.isqrt(q)) + 1, 2))


def _hadamard_plan(n: int) -> Optional[Tuple[int, int]]:
    """(k, m) with n = 2^k * m, m = 1 (Sylvester) or m = q + 1 with q prime, q = 3 mod 4
    (Paley I); None if no such split exists. Prefers the largest Sylvester factor."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # the power of 2 in n
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1 or (_is_prime(m - 1) and (m - 1) % 4 == 3):
            return j, m
    return None


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for q prime, q = 3 (mod 4).

    Q[i, j] = chi(j - i) (the Legendre symbol mod q, chi(0) = 0) is antisymmetric with
    Q Q^T = q I - J; then H = I + [[0, 1^T], [-1, Q]] has H H^T = (q + 1) I."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    Q = chi[(idx[None, :] - idx[:, None]) % q]  # (q, q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An unnormalised (n, n) Hadamard matrix (entries +-1, H H^T = n I).

    Sylvester for powers of 2, Paley I for n = q + 1 (q prime, q = 3 mod 4: 4, 8, 12, 20, 24,
    32, 44, 48, ...), and their Kronecker products, n = 2^k (q + 1): e.g. 12, 20, 24, 48, 96,
    192, 384, 768 (= 12 * 64), 1024, 1152 (= 72 * 16), 1280 (= 20 * 64), 1536. Orders above 2
    must be multiples of 4; others (and the few multiples of 4 these constructions miss) raise
    ``ValueError``."""
    n = int(n)
    plan = _hadamard_plan(n)
    if plan is None:
        raise ValueError(f"no Hadamard matrix of order {n} can be built here (Sylvester 2^k, Paley "
                         "q+1 with q prime = 3 mod 4, and their products); PHI-S needs one for a "
                         f"teacher of dimension {n}: use `norm: stats` for this teacher instead")
    k, m = plan
    H = _paley(m - 1) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        H = torch.kron(h2, H)
    return H.to(dtype)


# ----------------------------------------------------------------------------------------------
# Normalisers
# ----------------------------------------------------------------------------------------------
class TargetNorm(nn.Module):
    """Base class: maps teacher features (..., C) to float32 targets (..., C).

    ``needs_fit``: whether :meth:`fit` must see a :class:`FeatureStats` of this teacher first.
    The fitted statistics are buffers and ``fitted`` a persistent bool buffer, so
    ``state_dict()`` / ``load_state_dict()`` carry them through checkpoint and resume."""

    kind: str = ""
    needs_fit: bool = False

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"{type(self).__name__}: dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.register_buffer("fitted", torch.tensor(not self.needs_fit), persistent=True)
        self._is_fitted = not self.needs_fit  # a Python mirror: no device sync per forward

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, stats: FeatureStats) -> "TargetNorm":
        """Learn the statistics from ``stats`` (a no-op for normalisers that need none)."""
        if stats.dim != self.dim:
            raise ValueError(f"{type(self).__name__}(dim={self.dim}) cannot fit statistics of "
                             f"dimension {stats.dim}")
        if self.needs_fit:
            self._fit(stats)
            self.fitted.fill_(True)
            self._is_fitted = True
        return self

    def _fit(self, stats: FeatureStats) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_fitted = bool(self.fitted)

    def _check(self, x: torch.Tensor) -> None:
        if self.needs_fit and not self._is_fitted:
            raise RuntimeError(f"{type(self).__name__}(dim={self.dim}) has no statistics yet: fit it "
                               "on N images first (FeatureStats.update over this teacher's tokens, "
                               "then .fit(stats)), or load a checkpoint that holds them")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}(dim={self.dim}): expected (..., {self.dim}) "
                             f"features, got shape {tuple(x.shape)}")

    # -- mapping ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C) float32
        self._check(x)
        return self._forward(x.float())

    def inverse(self, y: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C) float32
        """Teacher-space features from normalised ones (e.g. to read a student head's output
        as teacher features)."""
        self._check(y)
        return self._inverse(y.float())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not invertible")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kind={self.kind!r}"


class TokenStandardize(TargetNorm):
    """FD's target standardisation: per token, zero mean and unit variance over channels,
    ``F.layer_norm(x, (C,), eps)`` without affine (Wei et al., arXiv 2205.14141, Sec. 3.1).

    eps 1e-5, as the official ``nn.LayerNorm(C, elementwise_affine=False)`` and
    :func:`fdistill.losses.normalize_target`. Not invertible: each token's own mean and scale are
    discarded."""

    kind, needs_fit = "standardize", False

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim)
        self.eps = float(eps)

    def _forward(self, x):
        return F.layer_norm(x, (self.dim,), eps=self.eps)  # (..., C)

    def _inverse(self, y):
        raise NotImplementedError("TokenStandardize is not invertible: per-token standardisation "
                                  "discards each token's mean and scale; use `stats` or `phi_s` "
                                  "to map student outputs back to teacher features")


class ChannelStats(TargetNorm):
    """Per-channel standardisation with this teacher's statistics:
    y = (x - mean) / sqrt(var + eps), mean and var per channel over the fitting set
    (UNIC, Sariyildiz et al., arXiv 2408.05088; Theia, Shang et al., arXiv 2407.20179).

    Buffers (float32): ``mean`` (C,), ``std`` (C,) = sqrt(var + eps), computed in float64."""

    kind, needs_fit = "stats", True

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim)
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))

    def _fit(self, stats):
        var = stats.cov().diagonal().clamp_min(0.0)  # (C,) float64
        self.mean.copy_(stats.mean().to(self.mean))
        self.std.copy_((var + self.eps).sqrt().to(self.std))

    def _forward(self, x):
        return (x - self.mean) / self.std

    def _inverse(self, y):
        return y * self.std + self.mean


class PhiS(TargetNorm):
    """PHI-S (Ranzinger et al., "PHI-S: Distribution Balancing for Label-Free Multi-Source
    Learning", arXiv 2410.01680): a rotation to the eigenbasis, a Hadamard rotation that spreads
    the variance evenly over channels, and one isotropic scale.

    With mean mu and covariance Sigma = U diag(lambda) U^T (``eigh``, float64)::

        y = (1 / alpha) H U^T (x - mu)         alpha = sqrt(mean(lambda))
        x = U H^T (alpha y) + mu               (the inverse: H and U are orthogonal)

    H is the normalised Hadamard matrix of order C (H H^T = I, every entry +-1/sqrt(C)), so
    diag(H diag(lambda) H^T) = mean(lambda) for every channel: every output channel has
    variance exactly 1.

    PHI-S is deliberately NOT whitening: the output covariance is
    H diag(lambda) H^T / mean(lambda), whose diagonal is all ones but whose off-diagonals are
    not zero; its eigenvalues are lambda / mean(lambda) (a rotation keeps the spectrum). The
    anisotropy of the teacher's distribution is kept, only balanced across channels (and
    weak directions are not blown up as whitening would).

    The eigenvectors' signs are fixed (the largest-magnitude entry of each is positive) so that
    refitting the same statistics gives the same transform. Buffers (float32, computed in
    float64): ``mean`` (C,), ``rotation`` (C, C) = H U^T, ``alpha`` (). C must have a Hadamard
    matrix (see :func:`hadamard`); the constructor checks."""

    kind, needs_fit = "phi_s", True

    def __init__(self, dim: int):
        super().__init__(dim)
        if _hadamard_plan(self.dim) is None:
            hadamard(self.dim)  # raises the explanatory ValueError
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("rotation", torch.eye(self.dim))
        self.register_buffer("alpha", torch.ones(()))

    def _fit(self, stats):
        C = self.dim
        sigma = stats.cov()  # (C, C) float64
        lam, U = torch.linalg.eigh(sigma.cpu())  # ascending; U (C, C) columns = eigenvectors
        lam = lam.clamp_min(0.0)
        m = float(lam.mean())
        if not m > 1e-30:
            raise ValueError(f"PhiS(dim={C}).fit: the features have zero variance (trace of the "
                             f"covariance {float(sigma.trace()):.3g}) over {stats.count} samples; "
                             "fit on more / non-constant teacher features")
        flip = U.gather(0, U.abs().argmax(dim=0, keepdim=True)).sign()  # (1, C)
        U = U * torch.where(flip == 0, torch.ones_like(flip), flip)
        H = hadamard(C) / math.sqrt(C)  # (C, C), orthogonal
        R = H @ U.T  # (C, C)
        self.mean.copy_(stats.mean().to(self.mean))
        self.rotation.copy_(R.to(self.rotation))
        self.alpha.fill_(math.sqrt(m))

    def _forward(self, x):
        return ((x - self.mean) @ self.rotation.T) / self.alpha  # (..., C): rows y = R (x - mu) / alpha

    def _inverse(self, y):
        return (y * self.alpha) @ self.rotation + self.mean  # rows x = R^T (alpha y) + mu


class L2Norm(TargetNorm):
    """Unit L2 norm per token (``F.normalize`` over C). Not invertible (the norm is lost)."""

    kind, needs_fit = "l2", False

    def _forward(self, x):
        return F.normalize(x, dim=-1)

    def _inverse(self, y):
        raise NotImplementedError("L2Norm is not invertible: each token's norm is discarded")


class NoNorm(TargetNorm):
    """Identity (the raw teacher features, as float32)."""

    kind, needs_fit = "none", False

    def _forward(self, x):
        return x

    def _inverse(self, y):
        return y


_KINDS = {"standardize": TokenStandardize, "stats": ChannelStats, "phi_s": PhiS, "l2": L2Norm,
          "none": NoNorm}
assert tuple(_KINDS) == TARGET_NORMS


def build_target_norm(kind: str, dim: int) -> TargetNorm:
    """The normaliser ``kind`` (one of :data:`TARGET_NORMS`) for a teacher of dimension ``dim``."""
    if kind not in _KINDS:
        raise ValueError(f"unknown target norm {kind!r}; expected one of {', '.join(TARGET_NORMS)}")
    return _KINDS[kind](dim)
