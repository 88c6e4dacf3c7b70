"""Filter-normalised loss landscapes (Li et al. 2018): exact restore, slice norms, scale invariance."""
import pytest
import torch
import torch.nn as nn

from fdistill.diagnostics import alpha_grid, evaluate_classifier, filter_normalized_direction, loss_landscape
from fdistill.diagnostics.classifier import fit_linear_head


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


class _Net(nn.Module):
    """Linear -> non-affine LayerNorm -> GELU -> Linear: scaling the first layer changes nothing."""

    def __init__(self, d=12, h=16, k=4):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h, elementwise_affine=False)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)  # a 3-d weight: filters along dim 0
        self.fc2 = nn.Linear(2 * h, k)

    def forward(self, x):
        z = nn.functional.gelu(self.norm(self.fc1(x)))  # (B, h)
        z = self.conv(z.unsqueeze(1)).flatten(1)  # (B, 2h)
        return self.fc2(z)


def _data(n=96, d=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return list(zip(x.split(32), y.split(32)))


def test_direction_slices_have_weight_norms_and_1d_zero():
    torch.manual_seed(0)
    net = _Net()
    d = filter_normalized_direction(net, seed=3)
    assert set(d) == {n for n, _ in net.named_parameters()}
    for name, p in net.named_parameters():
        assert d[name].shape == p.shape and d[name].dtype == p.dtype
        if p.dim() == 1:
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            dn = d[name].reshape(p.shape[0], -1).norm(dim=1)
            assert torch.allclose(dn, wn, rtol=1e-5), name
    # deterministic per seed, different across seeds
    assert all(torch.equal(d[n], v) for n, v in filter_normalized_direction(net, seed=3).items())
    assert not torch.equal(d["fc1.weight"], filter_normalized_direction(net, seed=4)["fc1.weight"])


def test_zero_weight_slice_gets_zero_direction():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[1] = 0
    d = filter_normalized_direction(lin, 0)["weight"]
    assert torch.all(d[1] == 0) and torch.all(torch.isfinite(d))


def test_alpha_zero_reproduces_model_and_weights_restored_exactly():
    torch.manual_seed(0)
    net = _Net().train()  # the sweep runs in eval mode and restores the mode
    batches = _data()
    before = {n: p.detach().clone() for n, p in net.state_dict().items()}
    net.eval()
    loss0, acc0 = evaluate_classifier(net, batches)
    net.train()
    res = loss_landscape(net, batches, seeds=[0, 1, 2], alphas=alpha_grid(11), progress=False)
    assert net.training
    assert res.alphas[5] == 0.0 and len(res.loss) == 3 and len(res.loss[0]) == 11
    for curve, accs in zip(res.loss, res.accuracy):
        assert curve[5] == loss0 and accs[5] == acc0  # exactly, not approximately
    assert res.loss0 == loss0 and res.accuracy0 == acc0
    for n, p in net.state_dict().items():
        assert torch.equal(p, before[n]), n  # bit-exact: no add/subtract drift
    # the curves are not flat: the weights were really moved
    assert max(res.loss[0]) > loss0 + 1e-3


def test_first_layer_scale_before_layernorm_gives_same_curve():
    torch.manual_seed(0)
    net = _Net()
    scaled = _Net()
    scaled.load_state_dict(net.state_dict())
    with torch.no_grad():
        scaled.fc1.weight.mul_(10)
        scaled.fc1.bias.mul_(10)
    batches = _data()
    alphas = alpha_grid(9)
    a = loss_landscape(net, batches, seeds=[0, 1], alphas=alphas, progress=False)
    b = loss_landscape(scaled, batches, seeds=[0, 1], alphas=alphas, progress=False)
    for la, lb in zip(a.loss, b.loss):
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    assert a.accuracy == b.accuracy
    # with a raw (not filter-normalised) direction the two curves differ: the test has teeth
    def raw_loss(model):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        return evaluate_classifier(model, batches)[0]

    assert raw_loss(net) != pytest.approx(raw_loss(scaled), rel=1e-2)


def test_seeds_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        loss_landscape(_Net(), _data(), seeds=[1, 1], progress=False)


def test_alpha_grid_default():
    g = alpha_grid()
    assert len(g) == 51 and g[0] == -1.0 and g[-1] == 1.0 and g[25] == 0.0


def test_linear_head_fits_separable_data():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(60) % 3
    x = centers[y] + 0.1 * torch.randn(60, 8, generator=g)
    head = fit_linear_head(x, y, 3)
    assert (head(x).argmax(1) == y).all()
    assert not head.weight.requires_grad


def test_diverged_points_are_inf_in_memory_null_in_json(tmp_path):
    import json

    from fdistill.diagnostics.plots import plot_loss_landscape, save_json_atomic

    class Diverged(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    loss, acc = evaluate_classifier(Diverged(), [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))])
    assert loss == float("inf") and acc == 0.0
    m = dict(label="m", alphas=[-1.0, 0.0, 1.0], seeds=[0], loss=[[float("inf"), 0.5, 2.0]], accuracy=[[0.1, 0.9, 0.5]])
    png = plot_loss_landscape([m], tmp_path / "l.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_json_atomic(dict(models=[m]), tmp_path / "l.json")
    assert json.loads((tmp_path / "l.json").read_text())["models"][0]["loss"][0] == [None, 0.5, 2.0]
