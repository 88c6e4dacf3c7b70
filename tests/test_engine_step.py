"""TrainStep against a hand-written reference step; skipping; real torch.compile (opt-in)."""
import copy
import os

import pytest
import torch

from fdistill import FeatureDistiller, create_student
from fdistill.engine.optim import create_adamw
from fdistill.engine.step import TrainStep


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


@pytest.fixture
def distiller(tiny_vit_teacher):
    student = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             drop_path_rate=0.0)
    return FeatureDistiller(tiny_vit_teacher, student, cls_weight=1.0).train()


def test_one_step_equals_the_reference_step(distiller):
    ref = copy.deepcopy(distiller)
    images = [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8) for _ in range(2)]
    step = TrainStep(distiller, create_adamw(distiller.branch, lr=1e-2), clip_grad=0.05, accum_steps=2)
    outs, grad_norm, ok = step(images)

    # reference: mean of the two micro-batch losses, clip, plain AdamW (not fused)
    opt = create_adamw(ref.branch, lr=1e-2, fused=False)
    ref_losses = [ref(x)["loss"] for x in images]
    (sum(ref_losses) / 2).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.trainable_parameters()), 0.05)
    opt.step()
    assert bool(ok) and grad_norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)
    assert ref_norm > 0.05  # clipping was active
    assert [o["loss"].item() for o in outs] == pytest.approx([r.item() for r in ref_losses], rel=1e-6)
    for (n, a), b in zip(distiller.branch.named_parameters(), ref.branch.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert all(p.grad is None for p in distiller.branch.parameters())  # zeroed for the next step


def test_nonfinite_gradient_skips_the_update(distiller):
    step = TrainStep(distiller, create_adamw(distiller.branch, lr=1e-2))
    before = {k: v.clone() for k, v in distiller.branch.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")  # poisons the loss and every gradient
    _, grad_norm, ok = step([x])
    assert not bool(ok) and not torch.isfinite(grad_norm)
    after = distiller.branch.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not step.optimizer.state or all(int(s["step"]) == 0 for s in step.optimizer.state.values())


class _BNLoss(torch.nn.Module):
    """A linear layer and a batch norm in training mode; the loss is the mean output."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return {"loss": self.bn(self.fc(x)).pow(2).mean()}


@pytest.mark.parametrize("fused", [True, False], ids=["device-skip", "host-skip"])
def test_skipped_step_leaves_batch_norm_statistics_as_they_were(fused):
    torch.manual_seed(0)
    m = _BNLoss().train()
    step = TrainStep(m, torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused))
    _, _, ok = step([torch.randn(8, 4)])
    assert bool(ok)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = torch.randn(8, 4)
    bad[0, 0] = float("nan")
    _, _, ok = step([bad])
    assert not bool(ok)
    # the forward did update them (to NaN, count + 1); the skipped step put every one back
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert int(m.bn.num_batches_tracked) == 1
    _, _, ok = step([torch.randn(8, 4)])  # and an applied step still updates them
    assert bool(ok) and int(m.bn.num_batches_tracked) == 2
    assert not torch.equal(before["bn.running_mean"], m.bn.running_mean)
    m.eval()  # eval mode: the statistics are not touched, nothing is copied
    assert step._running_stats() == []


def test_wrong_number_of_micro_batches_is_an_error(distiller):
    step = TrainStep(distiller, create_adamw(distiller.branch, lr=1e-2), accum_steps=2)
    with pytest.raises(ValueError, match="expected 2 micro-batches"):
        step([torch.rand(2, 3, 32, 32)])
    with pytest.raises(ValueError, match="precision"):
        TrainStep(distiller, step.optimizer, precision="fp8")


@pytest.mark.skipif(not os.environ.get("FDISTILL_TEST_COMPILE"),
                    reason="torch.compile takes minutes on a shared CPU; set FDISTILL_TEST_COMPILE=1")
def test_compiled_step_matches_eager(distiller):
    eager = copy.deepcopy(distiller)
    x = [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)]
    a = TrainStep(distiller, create_adamw(distiller.branch, lr=1e-2), compile=True)
    b = TrainStep(eager, create_adamw(eager.branch, lr=1e-2))
    (oa,), _, _ = a(x)
    (ob,), _, _ = b(x)
    assert a.forward is not distiller  # still compiled: no fallback happened
    assert oa["loss"].item() == pytest.approx(ob["loss"].item(), rel=1e-4)


def test_fp16_follows_the_official_grad_scaler(distiller):
    """``train.precision=fp16`` is main_fd.py's AMP: ``amp.GradScaler()`` with its defaults (scale
    2^16, x2 after 2000 finite steps, /2 on an overflow), ``unscale_`` before clipping (the clip
    sees true gradients), and an overflowing step skipped with the weights untouched."""
    step = TrainStep(distiller, create_adamw(distiller.branch, lr=1e-3), precision="fp16", clip_grad=3.0)
    s = step.scaler
    assert s.is_enabled() and s.get_scale() == 2.0 ** 16
    assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (2.0, 0.5, 2000)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    # the clip sees unscaled gradients: a norm of the gradients' own size, not scaled by 2^16
    _, norm, ok = step([x])
    assert bool(ok) and 0 < float(norm) < 1e3
    # an overflow: the step is skipped, the weights stay, the scale halves
    before = [p.detach().clone() for p in distiller.branch.parameters()]
    first = next(p for p in distiller.branch.parameters() if p.requires_grad)
    hook = first.register_hook(lambda g: torch.full_like(g, float("inf")))
    _, norm, ok = step([x])
    hook.remove()
    assert not bool(ok)
    assert s.get_scale() == 2.0 ** 15
    assert all(torch.equal(a, b) for a, b in zip(distiller.branch.parameters(), before))
    _, _, ok = step([x])
    assert bool(ok) and not all(torch.equal(a, b) for a, b in zip(distiller.branch.parameters(), before))
