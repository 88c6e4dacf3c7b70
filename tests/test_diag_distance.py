"""Attention distance and attention maps: exact oracles worked out by hand (issue 5)."""
import math

import pytest
import torch

from fdistill.diagnostics import AttentionDistanceMeter, AttentionMapMeter, attention_distance, select_layers
from fdistill.diagnostics.distance import grid_distances
from fdistill.diagnostics.maps import default_layers, mean_attention_map


def _uniform(g, prefix=0, B=1, H=1):
    T = prefix + g * g
    return torch.full((B, H, T, T), 1.0 / T)


def _pointer(g, prefix, target):
    """Each patch query puts all its weight on the patch ``target(r, c) -> (r', c')``."""
    T = prefix + g * g
    a = torch.zeros(1, 1, T, T)
    a[0, 0, :prefix, 0] = 1.0  # prefix rows: anything that sums to 1
    for r in range(g):
        for c in range(g):
            r2, c2 = target(r, c)
            a[0, 0, prefix + r * g + c, prefix + r2 * g + c2] = 1.0
    return a


def test_grid_distances_are_pixels():
    d = grid_distances((2, 3), 16)
    assert d.shape == (6, 6)
    # (0,0) -> (1,2): sqrt(1 + 4) patches
    assert d[0, 5].item() == pytest.approx(16 * math.sqrt(5))
    assert torch.all(torch.diagonal(d) == 0)
    # non-square patches: one row step is 8 px, one column step 16 px
    assert grid_distances((2, 2), (8, 16))[0, 3].item() == pytest.approx(math.hypot(8, 16))


def test_uniform_4x4_oracle():
    a = _uniform(4)
    kept = attention_distance(a, (4, 4), 16, num_prefix_tokens=0, exclude_self=False)
    others = attention_distance(a, (4, 4), 16, num_prefix_tokens=0, exclude_self=True, renormalize=True)
    assert kept.item() == pytest.approx(32.1282, abs=1e-4)
    assert others.item() == pytest.approx(34.2701, abs=1e-4)
    # same numbers with a [CLS] token that takes its uniform share, once the weights are renormalised
    a1 = _uniform(4, prefix=1)
    assert attention_distance(a1, (4, 4), 16, exclude_self=False).item() == pytest.approx(32.1282, abs=1e-4)
    assert attention_distance(a1, (4, 4), 16).item() == pytest.approx(34.2701, abs=1e-4)
    # without renormalisation, self and prefix weight count as distance 0
    assert attention_distance(a, (4, 4), 16, num_prefix_tokens=0, renormalize=False).item() == \
        pytest.approx(32.1282, abs=1e-4)
    assert attention_distance(a1, (4, 4), 16, renormalize=False).item() == pytest.approx(32.1282 * 16 / 17, abs=1e-4)


def test_uniform_14x14_oracle():
    a = _uniform(14, prefix=1)
    assert attention_distance(a, (14, 14), 16, exclude_self=False).item() == pytest.approx(116.4922, abs=1e-4)
    assert attention_distance(a, (14, 14), 16).item() == pytest.approx(117.0896, abs=1e-4)


def test_default_is_renormalised_without_self():
    a = _uniform(4, prefix=1)
    assert attention_distance(a, (4, 4), 16).item() == pytest.approx(34.2701, abs=1e-4)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_identity_is_zero_without_nan(exclude_self, renormalize):
    a = torch.eye(17).expand(2, 3, 17, 17)
    d = attention_distance(a, (4, 4), 16, exclude_self=exclude_self, renormalize=renormalize)
    assert d.shape == (3,) and torch.all(torch.isfinite(d)) and torch.all(d == 0)


def test_right_neighbour_and_diagonal():
    # right-hand neighbour (the last column points left: still one step)
    right = _pointer(4, 1, lambda r, c: (r, c + 1) if c < 3 else (r, c - 1))
    assert attention_distance(right, (4, 4), 16).item() == pytest.approx(16.0, abs=1e-5)
    diag = _pointer(4, 1, lambda r, c: (r + 1 if r < 3 else r - 1, c + 1 if c < 3 else c - 1))
    assert attention_distance(diag, (4, 4), 16).item() == pytest.approx(22.6274, abs=1e-4)


def test_per_head_and_batch_average():
    # head 0 identity-like (all on self), head 1 uniform; image 1 uniform in both heads
    T = 17
    a = torch.empty(2, 2, T, T)
    a[0, 0] = torch.eye(T)
    a[0, 1] = 1.0 / T
    a[1] = 1.0 / T
    d = attention_distance(a, (4, 4), 16, exclude_self=False)
    assert d[0].item() == pytest.approx(32.1282 / 2, abs=1e-4)
    assert d[1].item() == pytest.approx(32.1282, abs=1e-4)


def test_meter_streams_like_one_batch():
    torch.manual_seed(0)
    a = torch.randn(6, 3, 17, 17).softmax(-1)
    m = AttentionDistanceMeter((4, 4), 16)
    for layer in range(2):
        for chunk in a.split(2):
            m.update(layer, chunk)
    out = m.compute()
    ref = attention_distance(a, (4, 4), 16)
    assert out.shape == (2, 3)
    assert torch.allclose(out[0], ref, atol=1e-5) and torch.allclose(out[1], ref, atol=1e-5)


def test_meter_layers_with_their_own_geometry_and_head_counts():
    """Swin-like: layer 0 attends in 4x4 windows of 4 px tokens, no prefix, 1 head; layer 1 over a
    global 4x4 grid of 16 px patches behind [CLS], 3 heads."""
    torch.manual_seed(0)
    win = torch.randn(8, 1, 16, 16).softmax(-1)
    glob = torch.randn(2, 3, 17, 17).softmax(-1)
    m = AttentionDistanceMeter((4, 4), 16)
    m.update(0, win, grid_size=(4, 4), patch_size=4, num_prefix_tokens=0)
    m.update(1, glob)
    per_layer = m.compute_layers()
    assert [d.shape for d in per_layer] == [(1,), (3,)]
    assert torch.allclose(per_layer[0], attention_distance(win, (4, 4), 4, num_prefix_tokens=0), atol=1e-5)
    assert torch.allclose(per_layer[1], attention_distance(glob, (4, 4), 16), atol=1e-5)
    with pytest.raises(RuntimeError, match="different head counts"):
        m.compute()
    with pytest.raises(ValueError, match="heads"):
        m.update(0, glob[:, :, 1:, 1:], grid_size=(4, 4), patch_size=4, num_prefix_tokens=0)


def test_wrong_token_count_is_an_error():
    with pytest.raises(ValueError, match="prefix"):
        attention_distance(_uniform(4, prefix=0), (4, 4), 16, num_prefix_tokens=1)


def test_maps_rows_sum_to_one_and_identity():
    torch.manual_seed(0)
    a = torch.randn(4, 3, 17, 17).softmax(-1)
    m = AttentionMapMeter(layers=[0, 2])
    for layer in range(3):
        m.update(layer, a[:2])
        m.update(layer, a[2:])
    maps = m.compute()
    assert sorted(maps) == [0, 2]
    assert torch.allclose(maps[0].sum(-1), torch.ones(17), atol=1e-5)
    assert torch.allclose(maps[0], a.mean(dim=(0, 1)), atol=1e-6)
    eye = mean_attention_map(torch.eye(17).expand(2, 3, 17, 17))
    assert torch.equal(eye, torch.eye(17))


def test_layer_selection():
    assert default_layers(12) == [0, 1, 9, 10, 11]
    assert default_layers(2) == [0, 1] and default_layers(1) == [0]
    assert select_layers(12) == [0, 1, 9, 10, 11]
    assert select_layers(12, [1, -1, 12]) == [0, 11]
    with pytest.raises(ValueError, match="does not exist"):
        select_layers(4, [5])
    with pytest.raises(ValueError, match="does not exist"):
        select_layers(4, [0])
