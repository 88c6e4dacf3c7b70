"""The training step asks the device nothing: no ``.item()``/``bool()``/``int()`` of a device
tensor, no ``torch.equal``, no data-dependent shapes, no tensors made from host data (each is a
host-device sync or a blocking copy on a GPU).

Checked on CPU by watching every aten call the step makes (forward, backward, clipping, AdamW)
through a ``TorchDispatchMode``; the straightforward for-loop optimizer, which must read the
non-finite flag on the host, is the positive control."""
import pytest
import torch
from timm.models.beit import Block
from torch.utils._python_dispatch import TorchDispatchMode

from fdistill import FeatureDistiller, create_student
from fdistill.engine.optim import create_adamw
from fdistill.engine.step import TrainStep

SYNCING = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
           "aten.unique"}
#: a tensor made from host data (``torch.tensor(list)``): a blocking host-to-device copy on a GPU.
#: 0-dim ones (``t[:, :1] = 10.0``) are exempt: torch fills with the scalar, no copy, no sync.
LIFT = {"aten.lift_fresh", "aten.lift_fresh_copy"}


class SyncWatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        name = name if name.startswith("aten.") else f"aten.{name}"
        self.ops.append(name)
        if name in SYNCING or (name in LIFT and args[0].dim() > 0):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def make_step(tiny_vit_teacher):
    def make(precision="fp32", fused=None, **kw):
        student = create_student("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                 drop_path_rate=0.2)
        for blk in student.blocks:  # what runs on a GPU: the CPU-only drop-path path reads its
            blk.__class__ = Block   # kept count on the host, free there, a sync on a device
        d = FeatureDistiller(tiny_vit_teacher, student, **kw).train()
        if precision == "bf16":
            d.teacher.to(torch.bfloat16)
        return TrainStep(d, create_adamw(d.branch, lr=1e-3, fused=fused), precision=precision, clip_grad=1.0)
    return make


@pytest.mark.parametrize("precision,kw", [
    ("fp32", {}),
    ("fp32", dict(mask_ratio=0.5, drop_masked=True)),  # MAE-style token dropping
    ("fp32", dict(mask_ratio=0.4)),                      # mask tokens
    ("bf16", dict(mask_ratio=0.5, drop_masked=True)),
])
def test_fast_step_makes_no_host_sync(make_step, precision, kw):
    step = make_step(precision, **kw)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    step([x])  # first step: optimizer state, lazy set-up
    with SyncWatch() as w:
        step([x])
    assert "aten.mm" in w.ops and "aten._fused_adamw_" in w.ops  # the watch saw forward, backward, update
    assert w.syncs == []


def test_watch_catches_the_for_loop_optimizer_sync(make_step):
    step = make_step(fused=False)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    step([x])
    with SyncWatch() as w:
        step([x])
    assert "aten._local_scalar_dense" in w.syncs  # bool(ok): the one sync such optimizers need
