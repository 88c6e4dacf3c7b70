"""Real data, two teachers at once (issue 15): the pre-trained CIFAR ResNet-56 of ../shared (a
``python:`` CNN, width 64, an 8x8 map, no [CLS]) and the project's own CLIP
(fdistill/assets/clip_mini, width 128, 8x8 + [CLS]) distilled together into one tiny ViT on
cifar10-jpg-mini, through the engine (``teachers:``). Both heads' losses fall, and the k-NN of the
student through each head is reported beside that teacher's own k-NN (printed and written to
``benchmarks/RESULTS.md`` by hand; the assertions are on the losses and on the heads being
informative, not on the k-NN numbers)."""
import json
from pathlib import Path

import pytest

from tests.conftest import CIFAR_MINI, RESNET_WEIGHTS, need_shared

pytestmark = [pytest.mark.realdata, pytest.mark.slow,
              need_shared(CIFAR_MINI / "train", CIFAR_MINI / "val", RESNET_WEIGHTS / "resnet56.safetensors")]

REPO = Path(__file__).resolve().parents[1]


def test_resnet56_and_clip_mini_into_one_student(tmp_path, capsys):
    from fdistill.assets import teacher_spec
    from fdistill.config import build_config
    from fdistill.config.distill import DistillConfig
    from fdistill.config.finetune import KnnConfig
    from fdistill.engine import distill
    from fdistill.eval.commands import run_knn

    resnet = (f"python:{REPO / 'examples' / 'cifar_resnet.py'}:resnet56",
              {"weights": str(RESNET_WEIGHTS / "resnet56.safetensors"), "feature_method": "forward_features",
               "img_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    clip = teacher_spec("clip_mini")
    teachers = json.dumps([{"name": "resnet", "spec": resnet[0], "kwargs": resnet[1], "norm": "stats"},
                           {"name": "clip", "spec": clip, "norm": "phi_s"}])
    run = tmp_path / "run"
    cfg = build_config(DistillConfig, REPO / "configs" / "distill" / "multi_tiny_cpu.yaml", [
        f"teachers={teachers}", f"data.path={CIFAR_MINI / 'train'}", "data.batch_size=64", "multi.stats_images=1024",
        "student.embed_dim=96", "student.num_heads=3", "student.depth=4", "optim.base_lr=4e-3", "train.epochs=3",
        "train.log_interval=10", "train.cpu_threads=2", f"train.output={run}"])
    r = distill(cfg)
    assert r.complete
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rec[0], rec[-1]
    for name in ("resnet", "clip"):
        assert last[f"loss_{name}"] < 0.8 * first[f"loss_{name}"], (name, first[f"loss_{name}"], last[f"loss_{name}"])

    knn_cfg = build_config(KnnConfig, None, ["data.img_size=32", "data.num_workers=0"])
    data = dict(train=str(CIFAR_MINI / "train"), val=str(CIFAR_MINI / "val"), echo=False)
    own = {"resnet": run_knn(knn_cfg, model=resnet[0], model_kwargs=resnet[1], **data)["top1"],
           "clip": run_knn(knn_cfg, model=clip, **data)["top1"]}
    heads = {n: run_knn(knn_cfg, model=str(run), model_kwargs={"head": n}, **data)["top1"] for n in own}
    student = run_knn(knn_cfg, model=str(run), **data)["top1"]
    with capsys.disabled():
        print(f"\nk-NN top-1 on cifar10-jpg-mini val: teacher resnet56 {own['resnet']:.1f}, student via its resnet "
              f"head {heads['resnet']:.1f}; teacher clip_mini {own['clip']:.1f}, student via its clip head "
              f"{heads['clip']:.1f}; student's own tokens {student:.1f}; losses {first['loss_resnet']:.3f} -> "
              f"{last['loss_resnet']:.3f} (resnet), {first['loss_clip']:.3f} -> {last['loss_clip']:.3f} (clip)")
    assert all(v > 15.0 for v in heads.values()), heads  # chance is 10%: the heads carry class information
