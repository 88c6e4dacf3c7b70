"""Per-teacher target normalisers (fdistill.multi.normalize): streaming statistics, FD's
per-token standardisation, per-channel stats, PHI-S (Ranzinger et al., arXiv 2410.01680) and the
Hadamard matrices it needs, checkpoint round trips and the error messages."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fdistill.multi.normalize as nz
from fdistill.engine.distributed import DistEnv
from fdistill.multi.normalize import (
    TARGET_NORMS,
    ChannelStats,
    FeatureStats,
    L2Norm,
    NoNorm,
    PhiS,
    TokenStandardize,
    build_target_norm,
    hadamard,
)


def _anisotropic(n: int, C: int, seed: int = 0) -> torch.Tensor:
    """(n, C) correlated data x = z A + b, the spectrum of A^T A spread over 2 decades."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    A = torch.diag(torch.logspace(0, 1, C, dtype=torch.float64)) @ Q  # singular values 1 .. 10
    b = 3.0 * torch.randn(C, generator=g, dtype=torch.float64)
    return z @ A + b


def _stats(x: torch.Tensor) -> FeatureStats:
    return FeatureStats(x.shape[-1]).update(x)


def _np_cov(x: torch.Tensor) -> np.ndarray:
    return np.cov(x.reshape(-1, x.shape[-1]).double().numpy(), rowvar=False, bias=True)


# ------------------------------------------------------------------------------------------
# FeatureStats
# ------------------------------------------------------------------------------------------
def test_feature_stats_match_numpy_over_chunks_of_different_shapes():
    C = 7
    chunks = [torch.randn(3, 5, C) * 2 + 1, torch.randn(11, C), torch.randn(2, 2, 4, C) - 3,
              torch.randn(1, C).double()]
    s = FeatureStats(C)
    for c in chunks:
        s.update(c)
    flat = torch.cat([c.reshape(-1, C).double() for c in chunks]).numpy()  # (M, C)
    assert s.count == flat.shape[0] == 15 + 11 + 16 + 1
    assert s.sum.dtype == s.sum_outer.dtype == torch.float64
    np.testing.assert_allclose(s.mean().numpy(), flat.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.cov().numpy(), np.cov(flat, rowvar=False, bias=True), rtol=0, atol=1e-12)
    # population, not sample, covariance: the unbiased one differs by M / (M - 1)
    assert not np.allclose(s.cov().numpy(), np.cov(flat, rowvar=False), rtol=0, atol=1e-6)


def test_feature_stats_all_reduce_sums_the_ranks(monkeypatch):
    """Two ranks emulated: rank 1's tensors are recorded, rank 0's call adds them in order; the
    reduced statistics must be those of both ranks' data together (and a no-op on one process)."""
    C = 5
    a, b = torch.randn(4, 6, C), torch.randn(9, C) + 2
    s0, s1 = _stats(a), _stats(b)

    seen, ops = [], []

    def record(t, op=torch.distributed.ReduceOp.SUM, **kw):
        ops.append(op)
        seen.append(t.clone())

    def add_peer(t, op=torch.distributed.ReduceOp.SUM, **kw):
        ops.append(op)
        t += seen.pop(0)

    env = DistEnv(rank=0, world_size=2)
    monkeypatch.setattr(torch.distributed, "all_reduce", record)
    s1.all_reduce_(DistEnv(rank=1, world_size=2))
    monkeypatch.setattr(torch.distributed, "all_reduce", add_peer)
    s0.all_reduce_(env)
    assert not seen and all(op == torch.distributed.ReduceOp.SUM for op in ops)

    both = torch.cat([a.reshape(-1, C), b]).double().numpy()
    assert s0.count == both.shape[0]
    np.testing.assert_allclose(s0.mean().numpy(), both.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(s0.cov().numpy(), np.cov(both, rowvar=False, bias=True), atol=1e-12)

    # a rank that saw nothing contributes zeros (and still takes part in the collective)
    empty = FeatureStats(C)
    monkeypatch.setattr(torch.distributed, "all_reduce", record)
    empty.all_reduce_(DistEnv(rank=1, world_size=2))
    assert len(seen) == 1 and not seen[0].any()
    seen.clear()

    # one process: nothing is sent
    def boom(*a, **k):
        raise AssertionError("all_reduce called on a world of one")

    monkeypatch.setattr(torch.distributed, "all_reduce", boom)
    before = s1.cov().clone()
    s1.all_reduce_(DistEnv())
    assert torch.equal(s1.cov(), before)


def test_feature_stats_refuses_non_finite_and_empty():
    s = FeatureStats(3)
    with pytest.raises(ValueError, match="no samples"):
        s.mean()
    with pytest.raises(ValueError, match="no samples"):
        s.cov()
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(4, 3)
        x[2, 1] = bad
        with pytest.raises(ValueError, match="non-finite"):
            s.update(x)
    assert s.count == 0  # nothing of the refused batches was added
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        s.update(torch.randn(4, 5))
    s.update(torch.ones(2, 3))
    assert s.count == 2 and torch.equal(s.mean(), torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# Hadamard
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16, 20, 24, 44, 48, 96, 768])
def test_hadamard_is_hadamard(n):
    H = hadamard(n)
    assert H.shape == (n, n)
    assert torch.equal(H.abs(), torch.ones(n, n, dtype=H.dtype))  # entries +-1
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=H.dtype))


@pytest.mark.parametrize("n", [3, 6, 10, 28])
def test_hadamard_missing_order_raises(n):
    with pytest.raises(ValueError, match=rf"order {n}.*norm: stats"):
        hadamard(n)
    with pytest.raises(ValueError, match=rf"dimension {n}"):
        build_target_norm("phi_s", n)  # refused at construction, not at the first fit


# ------------------------------------------------------------------------------------------
# TokenStandardize / L2Norm / NoNorm
# ------------------------------------------------------------------------------------------
def test_token_standardize_is_layer_norm_without_affine():
    x = (torch.randn(2, 9, 16) * 5 + 2).to(torch.bfloat16)  # (B, N, C)
    n = TokenStandardize(16)
    assert not n.needs_fit and bool(n.fitted)
    y = n(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, F.layer_norm(x.float(), (16,), eps=1e-5))  # FD's eps
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 9), atol=1e-3, rtol=0)
    with pytest.raises(NotImplementedError, match="not invertible"):
        n.inverse(y)


def test_l2_and_none():
    x = torch.randn(3, 4, 8) * 3
    y = L2Norm(8)(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(y * x.norm(dim=-1, keepdim=True), x)
    with pytest.raises(NotImplementedError):
        L2Norm(8).inverse(y)
    assert torch.equal(NoNorm(8)(x), x) and torch.equal(NoNorm(8).inverse(x), x)


# ------------------------------------------------------------------------------------------
# ChannelStats
# ------------------------------------------------------------------------------------------
def test_channel_stats_standardises_each_channel_and_inverts():
    C = 10
    x = (_anisotropic(4000, C).float() * torch.linspace(0.1, 20, C)).reshape(40, 100, C)  # (B, N, C)
    n = ChannelStats(C).fit(_stats(x))
    y = n(x)
    s = _stats(y)
    torch.testing.assert_close(s.mean(), torch.zeros(C, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.cov().diagonal(), torch.ones(C, dtype=torch.float64), atol=1e-4, rtol=0)
    # per channel only: the correlations stay
    assert (s.cov() - torch.eye(C, dtype=torch.float64)).abs().max() > 0.1
    torch.testing.assert_close(n.inverse(y), x, atol=1e-5, rtol=1e-5)
    # the buffers hold the fitting set's statistics
    torch.testing.assert_close(n.mean.double(), x.reshape(-1, C).double().mean(0), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(n.std.double() ** 2, torch.from_numpy(_np_cov(x).diagonal().copy()) + 1e-6,
                               rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------
# PHI-S
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [12, 16])
def test_phi_s_balances_channels_without_whitening(C):
    x = _anisotropic(20000, C, seed=C).float().reshape(100, 200, C)  # (B, N, C)
    stats = _stats(x)
    lam = torch.linalg.eigvalsh(stats.cov())  # input spectrum, ascending, float64
    assert lam.max() / lam.min() > 50  # truly anisotropic

    n = PhiS(C).fit(stats)
    y = n(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    out = _stats(y)
    cov_y = out.cov()
    torch.testing.assert_close(out.mean(), torch.zeros(C, dtype=torch.float64), atol=1e-4, rtol=0)
    # every output channel has variance exactly 1 ...
    torch.testing.assert_close(cov_y.diagonal(), torch.ones(C, dtype=torch.float64), atol=1e-4, rtol=0)
    # ... the spectrum is the input's divided by its mean (a rotation + one scale) ...
    torch.testing.assert_close(torch.linalg.eigvalsh(cov_y), lam / lam.mean(), atol=1e-4, rtol=1e-4)
    # ... so it is not whitening: the covariance is far from the identity
    off = cov_y - torch.diag(cov_y.diagonal())
    assert off.abs().max() > 0.2
    assert not torch.allclose(cov_y, torch.eye(C, dtype=torch.float64), atol=0.05)
    # the stored pieces: alpha = sqrt(mean lambda), rotation orthogonal
    assert math.isclose(float(n.alpha), math.sqrt(float(lam.mean())), rel_tol=1e-6)
    R = n.rotation.double()
    torch.testing.assert_close(R @ R.T, torch.eye(C, dtype=torch.float64), atol=1e-6, rtol=0)
    assert n.mean.dtype == n.rotation.dtype == n.alpha.dtype == torch.float32
    # invertible
    torch.testing.assert_close(n.inverse(y), x, atol=1e-4, rtol=1e-4)


def test_phi_s_two_dimensional_case_by_hand():
    """C = 2, H = [[1, 1], [1, -1]] / sqrt(2). Chosen statistics:

        mu = (1, 2);  eigenpairs  lambda = 1 with u = (0.8, -0.6),  lambda = 9 with v = (0.6, 0.8)
        Sigma = 1 u u^T + 9 v v^T = [[3.88, 3.84], [3.84, 6.12]]

    realised exactly (population covariance) by the 4 points mu +- sqrt(2) u, mu +- 3 sqrt(2) v:
    cov = (2 * 2 u u^T + 2 * 18 v v^T) / 4 = u u^T + 9 v v^T.

    eigh sorts ascending: U = [u, v] = [[0.8, 0.6], [-0.6, 0.8]] (signs: the largest-magnitude
    entry of each column positive: 0.8 in both). mean(lambda) = 5, alpha = sqrt(5).
    H U^T = [[1, 1], [1, -1]] [[0.8, -0.6], [0.6, 0.8]] / sqrt(2) = [[1.4, 0.2], [0.2, -1.4]] / sqrt(2).

    Outputs y = H U^T (x - mu) / sqrt(5):
        x = mu + sqrt(2) u    -> U^T (x - mu) = (sqrt 2, 0) -> H: (1, 1)   -> y = (1, 1) / sqrt 5
        x = mu + 3 sqrt(2) v  -> (0, 3 sqrt 2)               -> H: (3, -3) -> y = (3, -3) / sqrt 5
        x = mu + (1, 0)       -> y = (1.4, 0.2) / sqrt(10)
    Output covariance over the 4 points: (2 (1,1)(1,1)^T + 2 (3,-3)(3,-3)^T) / (4 * 5)
        = [[20, -16], [-16, 20]] / 20 = [[1, -0.8], [-0.8, 1]]: unit diagonal, not the identity,
    eigenvalues 0.2 and 1.8 = (1, 9) / 5.
    """
    mu = torch.tensor([1.0, 2.0], dtype=torch.float64)
    u = torch.tensor([0.8, -0.6], dtype=torch.float64)
    v = torch.tensor([0.6, 0.8], dtype=torch.float64)
    r2 = math.sqrt(2.0)
    pts = torch.stack([mu + r2 * u, mu - r2 * u, mu + 3 * r2 * v, mu - 3 * r2 * v])  # (4, 2)
    stats = _stats(pts)
    torch.testing.assert_close(stats.cov(), torch.tensor([[3.88, 3.84], [3.84, 6.12]], dtype=torch.float64))

    n = PhiS(2).fit(stats)
    torch.testing.assert_close(n.alpha, torch.tensor(math.sqrt(5.0)))
    torch.testing.assert_close(n.rotation, torch.tensor([[1.4, 0.2], [0.2, -1.4]]) / r2)
    torch.testing.assert_close(n.mean, torch.tensor([1.0, 2.0]))

    r5 = math.sqrt(5.0)
    y = n(pts.float())
    expect = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [3.0, -3.0], [-3.0, 3.0]]) / r5
    torch.testing.assert_close(y, expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(n(torch.tensor([[2.0, 2.0]])), torch.tensor([[1.4, 0.2]]) / math.sqrt(10.0),
                               atol=1e-6, rtol=0)
    cov_y = _stats(y).cov()
    torch.testing.assert_close(cov_y, torch.tensor([[1.0, -0.8], [-0.8, 1.0]], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.eigvalsh(cov_y), torch.tensor([0.2, 1.8], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(n.inverse(y), pts.float(), atol=1e-6, rtol=0)


def test_phi_s_refuses_constant_features():
    with pytest.raises(ValueError, match="zero variance"):
        PhiS(4).fit(_stats(torch.ones(10, 4)))


# ------------------------------------------------------------------------------------------
# Checkpoints, builder, errors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["stats", "phi_s"])
def test_state_dict_round_trip_is_bit_exact(kind):
    C = 12
    x = _anisotropic(3000, C).float().reshape(30, 100, C)
    fitted = build_target_norm(kind, C).fit(_stats(x))
    sd = fitted.state_dict()
    assert "fitted" in sd and bool(sd["fitted"])
    assert ({"mean", "std"} if kind == "stats" else {"mean", "rotation", "alpha"}) <= set(sd)

    fresh = build_target_norm(kind, C)
    assert not bool(fresh.fitted)
    with pytest.raises(RuntimeError, match="has no statistics yet: fit it on N images first"):
        fresh(x)
    fresh.load_state_dict(sd)
    assert bool(fresh.fitted)
    probe = torch.randn(2, 5, C) * 4
    assert torch.equal(fresh(probe), fitted(probe))
    assert torch.equal(fresh.inverse(probe), fitted.inverse(probe))

    # loading an unfitted state dict makes it unfitted again (the flag travels, both ways)
    fresh.load_state_dict(build_target_norm(kind, C).state_dict())
    with pytest.raises(RuntimeError, match="no statistics yet"):
        fresh(probe)


def test_builder_kinds_and_errors():
    assert TARGET_NORMS == ("standardize", "stats", "phi_s", "l2", "none")
    classes = {"standardize": TokenStandardize, "stats": ChannelStats, "phi_s": PhiS, "l2": L2Norm,
               "none": NoNorm}
    for kind in TARGET_NORMS:
        n = build_target_norm(kind, 8)
        assert type(n) is classes[kind] and n.kind == kind and n.dim == 8
        assert n.needs_fit == (kind in ("stats", "phi_s")) and bool(n.fitted) == (not n.needs_fit)
    with pytest.raises(ValueError, match="unknown target norm 'whiten'.*standardize, stats, phi_s, l2, none"):
        build_target_norm("whiten", 8)
    for kind in ("stats", "phi_s"):
        with pytest.raises(RuntimeError, match="has no statistics yet"):
            build_target_norm(kind, 8)(torch.randn(2, 8))
        with pytest.raises(RuntimeError, match="has no statistics yet"):
            build_target_norm(kind, 8).inverse(torch.randn(2, 8))
        with pytest.raises(ValueError, match="dimension 5"):
            build_target_norm(kind, 8).fit(_stats(torch.randn(3, 5)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        build_target_norm("standardize", 8)(torch.randn(2, 6))
    assert nz.__all__ and all(hasattr(nz, name) for name in nz.__all__)
