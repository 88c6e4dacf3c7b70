"""Every shell command in README.md and docs/*.md runs as written -- or is listed here as not
runnable on a CPU-only machine, with the reason.

The commands are the ```bash blocks (``\\`` continuations joined, comments dropped, here-documents
kept whole). Each one is either in :data:`RUN` (run here, offline, from a temporary working folder
that has the repository's ``configs/``, ``examples/``, ``benchmarks/`` and ``fdistill/`` as symlinks and
``../shared`` pointing at the real one, so relative paths and output folders work unchanged) or
in :data:`SKIP` (GPU / cluster / ImageNet-sized, with the reason). A command that is in neither
fails :func:`test_every_doc_command_is_classified`: a new or edited example must be run or
explicitly skipped. Commands that need ``../shared`` are skipped when it is absent.

The documents run in :data:`DOCS` order in ONE working folder (README first), each command as
written with the venv's ``fdistill`` first on PATH; a command identical to one that already ran
is not run twice (docs/distill.md repeats README's tiny run).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FDISTILL_SHARED", REPO.parent / "shared"))
DOCS = ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
LINKS = ("configs", "examples", "benchmarks", "fdistill")  # what the working folder sees of the repository
#: (``fdistill/`` for the shipped teacher fdistill/assets/clip_mini; the commands run the installed fdistill)

# -- the classification ---------------------------------------------------------------------------
GPU_IN = "ImageNet-1K paths and a full-size model: a GPU run"
MULTI_GPU = "multi-GPU / multi-node torchrun (8+ GPUs, ImageNet)"
NEEDS_GPU_RUN = "needs the output of a GPU-scale distillation run (runs/fd_clip_*)"
BENCH_CPU = ("minutes: the full-size ViT-S/16 benchmark at 224 on CPU (RESULTS.md has its numbers); the "
             "benchmark itself is tested with --config tiny in tests/test_perf_bench.py")
LANDSCAPE = ("CPU-sized but ~5-10 min on 2 cores: two full loss landscapes (21 points each way) on 200 real "
             "images; the same code runs small in tests/test_diag_landscape.py and in README's diagnose report")
BENCH_GPU = "a GPU benchmark config (CUDA); benchmarks/gpu_check.sh runs it on a GPU"

#: commands run here, normalised (whitespace collapsed) -> what to expect: ``rc`` (default 0),
#: text in ``stdout`` / ``stderr``, ``shared`` (needs ../shared; default: the command names it),
#: ``long``: seconds on one busy core (measured 2026-12-01) -- these run only with
#: FDISTILL_DOCS_LONG=1, to keep this test near 4 minutes (all of them passed then)
RUN: Dict[str, dict] = {
    # docs/evaluate.md, dense fine-tuning on CPU (measured 2026-12-02 on 2 busy cores: ~70 s and ~150 s)
    "fdistill segment --config tiny_cpu --model open_clip:local-dir:fdistill/assets/clip_mini --train synthetic:400 "
    "--output eval/segment data.crop_size=32 data.img_scale=[32,128] data.slide_stride=32 epochs=6 optim.lr=2e-3":
        {"stdout": "miou", "long": 80},
    "fdistill depth --config tiny_cpu --model open_clip:local-dir:fdistill/assets/clip_mini --train synthetic:400 "
    "--output eval/depth": {"stdout": "rmse", "long": 150},
    "fdistill detect --config synthetic_clip_mini --model open_clip:local-dir:fdistill/assets/clip_mini "
    "--train synthetic:400 --output eval/detect": {"stdout": "ap_box", "long": 450},
    # README.md, "Runnable here"
    "fdistill recipes distill": {"stdout": "distill/clip_vit_base_300ep"},
    "fdistill distill --config configs/distill/tiny_cpu.yaml --output runs/tiny_cpu": {},
    # docs/distill.md, several teachers
    "fdistill distill --config configs/distill/multi_tiny_cpu.yaml --output runs/multi_tiny": {"long": 40},
    "fdistill knn --compare open_clip:local-dir:fdistill/assets/clip_mini runs/multi_tiny --head clip "
    "--train synthetic:400 --output eval/knn_heads": {"stdout": "top1", "long": 20},
    "fdistill distill --config configs/distill/tiny_cpu.yaml --output runs/tiny_cpu train.epochs=3": {},
    "fdistill export runs/tiny_cpu --format timm": {},
    "fdistill knn --compare timm:vit_tiny_patch16_224 runs/tiny_cpu --train synthetic:2000 --output eval/knn "
    "--model-kwargs '{\"pretrained\": false, \"img_size\": 32, \"patch_size\": 4, \"depth\": 2, \"embed_dim\": 96, "
    "\"num_heads\": 3}' --model-kwargs '{}'": {},
    "fdistill linprobe --config configs/linprobe/tiny_cpu.yaml --model runs/tiny_cpu --train synthetic:2000 "
    "--output eval/lp": {},
    "fdistill finetune --config configs/finetune/tiny_cpu.yaml --model runs/tiny_cpu --train synthetic:2000 "
    "--output eval/ft epochs=1": {},
    "fdistill distill --config configs/demo/distill.yaml --output runs/fd_clip_mini student.patch_size=4 "
    "teacher.spec=open_clip:local-dir:fdistill/assets/clip_mini train.max_steps=30 data.batch_size=32 "
    "train.cpu_threads=1": {},
    "fdistill zeroshot --model runs/fd_clip_mini --val synthetic:500 --output eval/zs": {"stdout": "teacher_top1"},
    "fdistill diagnose report --model runs/tiny_cpu --label \"FD student\" --data synthetic:500 --images 32 "
    "--directions 2 --alphas 11 --out diag/tiny": {},
    "fdistill knn --model python:examples/cifar_resnet.py:resnet56 --train ../shared/data/cifar10-jpg-mini "
    "--model-kwargs '{\"weights\": \"../shared/weights/resnet-cifar10/resnet56.safetensors\", \"feature_method\": "
    "\"forward_features\", \"img_size\": 32}'": {},
    # docs/diagnose.md
    "fdistill distill --config multi_tiny_cpu --output runs/multi_res multi.resolutions=[16,48] "
    "multi.resolution_fraction=0.5": {"long": 40},
    "fdistill diagnose resolution --model runs/multi_res --sizes 16,24,48,64 --data synthetic --images 128 "
    "--out diag/resolution": {"stdout": "48 px", "long": 15},
    "fdistill diagnose attention-distance --model timm:vit_tiny_patch16_224 --model-kwargs '{\"pretrained\": false, "
    "\"img_size\": 32, \"patch_size\": 8, \"depth\": 4}' --label \"tiny ViT\" --data synthetic:200 --images 32 "
    "--batch-size 16 --out diag/tiny": {},
    "fdistill diagnose attention-distance --data synthetic:64 --images 8 --out diag/swin --model "
    "timm:swin_tiny_patch4_window7_224 --model-kwargs '{\"pretrained\": false, \"img_size\": 32, \"window_size\": 4, "
    "\"embed_dim\": 16, \"depths\": [2, 2], \"num_heads\": [1, 2]}'": {},
    # docs/distill.md
    "fdistill validate-config configs/distill/clip_vit_base_300ep.yaml optim.base_lr=1e-3 --print": {},
    "fdistill validate-config configs/segprobe/ade20k_linear.yaml": {},
    "fdistill info --config configs/distill/clip_vit_base_300ep.yaml teacher.kwargs.pretrained=false": {},
    "fdistill distill --config configs/distill/tiny_cpu.yaml optim.base_rl=1": {
        "rc": 2, "stderr": "fdistill distill: error: unknown config key 'optim.base_rl'; did you mean 'optim.base_lr'?"},
    # docs/evaluate.md
    "fdistill knn --train ../shared/data/cifar10-jpg-mini --output eval/knn --compare "
    "python:examples/cifar_resnet.py:resnet56 timm:vit_tiny_patch16_224 --model-kwargs '{\"weights\": "
    "\"../shared/weights/resnet-cifar10/resnet56.safetensors\", \"feature_method\": \"forward_features\", "
    "\"img_size\": 32}' --model-kwargs '{\"pretrained\": false, \"img_size\": 32, \"patch_size\": 4}'": {"long": 90},
    "fdistill finetune --model timm:vit_tiny_patch16_224 --model-kwargs '{\"pretrained\": false, \"img_size\": 32, "
    "\"patch_size\": 8, \"depth\": 2}' --train synthetic:512 --config configs/finetune/tiny_cpu.yaml --output "
    "eval/ft_tiny max_steps=20": {},
    "fdistill linprobe --model python:examples/cifar_resnet.py:resnet56 --model-kwargs '{\"weights\": "
    "\"../shared/weights/resnet-cifar10/resnet56.safetensors\", \"feature_method\": \"forward_features\", "
    "\"img_size\": 32}' --train ../shared/data/cifar10-jpg-mini --config configs/linprobe/tiny_cpu.yaml --output "
    "eval/lp_r56": {"long": 35},
    "fdistill knn --model python:examples/cifar_resnet.py:resnet56 --model-kwargs '{\"weights\": "
    "\"../shared/weights/resnet-cifar10/resnet56.safetensors\", \"feature_method\": \"forward_features\", "
    "\"img_size\": 32}' --train ../shared/data/cifar10-jpg-mini --output eval/knn_r56": {
        "long": 20, "note": "the same k-NN as README.md's ResNet-56 command; only --output differs"},
    "fdistill segprobe --config configs/segprobe/tiny_cpu.yaml --train synthetic:500 data.img_size=32 epochs=6 "
    "--compare python:examples/cifar_resnet.py:resnet56 python:examples/cifar_resnet.py:resnet56 --model-kwargs "
    "'{\"weights\": \"../shared/weights/resnet-cifar10/resnet56.safetensors\", \"feature_method\": "
    "\"forward_features\", \"img_size\": 32}' --model-kwargs '{\"feature_method\": \"forward_features\", "
    "\"img_size\": 32}' --output eval/seg_resnet": {"long": 25},
    "cat > r56_distill.yaml <<'EOF'": {"shared": False},  # writes the config file only (no data read)
    # docs/teachers.md
    "python examples/cifar_resnet.py --weights ../shared/weights/resnet-cifar10/resnet56.safetensors --data "
    "../shared/data/cifar10-jpg-mini/val": {"stdout": "82.50"},
    "fdistill info --config cifar_resnet56.yaml": {"shared": True},
    "fdistill distill --config cifar_resnet56.yaml": {"shared": True, "long": 50},
}

#: commands not run here -> why
SKIP: Dict[str, str] = {
    # docs/evaluate.md, dense fine-tuning: the full-size recipes, and the CPU examples that
    # tests/test_dense_segment.py and tests/test_dense_depth.py run in their own form
    "torchrun --nproc_per_node=8 -m fdistill.cli.main segment --config ade20k_upernet_vit_base --train "
    "/data/ADEChallengeData2016 --output runs/ade20k --compare timm:vit_base_patch16_clip_quickgelu_224.openai "
    "runs/fd_clip_vitb": MULTI_GPU,
    "torchrun --nproc_per_node=8 -m fdistill.cli.main depth --config nyuv2_vit_base --train /data/nyu --output "
    "runs/nyuv2 --compare timm:vit_base_patch16_clip_quickgelu_224.openai runs/fd_clip_vitb": MULTI_GPU,
    "torchrun --nproc_per_node=8 -m fdistill.cli.main detect --config coco_maskrcnn_vit_base --train /data/coco "
    "--output runs/coco --compare timm:vit_base_patch16_clip_quickgelu_224.openai runs/fd_clip_vitb": MULTI_GPU,
    "make demo": "the whole demo (~9 min); tests/test_demo.py runs it (slow) and CI runs `make demo QUICK=1`",
    "make test": "the whole test suite, this test included",
    # docs/distill.md, the SLURM script (its signal handling is tested by tests/test_preemption_torchrun.py)
    "srun torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$(scontrol "
    "show hostnames $SLURM_JOB_NODELIST | head -n1):29500 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "
    "--shutdown-timeout=90 -m fdistill.cli.main distill --config configs/distill/clip_vit_base_300ep.yaml --data "
    "/path/to/imagenet/train --output /shared/runs/fd_clip_b": MULTI_GPU + " under SLURM",
    # docs/evidence.md
    "make reproduce-mini": "the miniature protocol (~2 h on 2 cores); docs/evidence.md has its results",
    "make reproduce-mini QUICK=1": "~20 min: tests/test_miniature.py::test_quick_protocol runs it with FDISTILL_MINI=1",
    "fdistill reproduce-mini --check --output runs/mini": "needs a finished `make reproduce-mini` (runs/mini); "
                                                          "tests/test_miniature.py runs the checker on a micro run",
    # README.md, "Reproducing the paper"
    "fdistill distill --config configs/distill/clip_vit_base_300ep.yaml --data /data/imagenet/train --output "
    "runs/fd_clip_vitb": GPU_IN,
    "fdistill finetune --config configs/finetune/vit_base.yaml --train /data/imagenet --output runs/ft_clip_vitb "
    "--model timm:vit_base_patch16_clip_quickgelu_224.openai": GPU_IN + " (and the OpenAI CLIP download)",
    "fdistill finetune --config configs/finetune/vit_base.yaml --train /data/imagenet --output runs/ft_fd_clip_vitb "
    "--model runs/fd_clip_vitb": GPU_IN,
    "fdistill finetune --config configs/finetune/vit_base.yaml --train /data/imagenet --output runs/table1 "
    "--compare timm:vit_base_patch16_clip_quickgelu_224.openai runs/fd_clip_vitb": GPU_IN,
    "fdistill zeroshot --model runs/fd_clip_vitb --text-model open_clip:ViT-B-16/openai --val /data/imagenet/val "
    "--output eval/zs": GPU_IN + " (the same command at CPU scale runs above: runs/fd_clip_mini)",
    "fdistill linprobe --config configs/linprobe/mae.yaml --compare timm:vit_base_patch16_clip_quickgelu_224.openai "
    "runs/fd_clip_vitb --train /data/imagenet --output eval/lp": GPU_IN,
    "fdistill diagnose report --model timm:vit_base_patch16_clip_quickgelu_224.openai --label CLIP --model "
    "runs/fd_clip_vitb --label FD-CLIP --data /data/imagenet --images 128 --device cuda --out diag/clip_vs_fd": GPU_IN,
    # README.md, "Many GPUs"; docs/distill.md
    "torchrun --nproc_per_node=8 -m fdistill.cli.main distill --config configs/distill/clip_vit_base_300ep.yaml "
    "--data /data/imagenet/train --output runs/fd_clip_vitb": MULTI_GPU,
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=fd_clip_b --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 -m "
    "fdistill.cli.main distill --config configs/distill/clip_vit_base_300ep.yaml --data /data/imagenet/train "
    "--output /shared/runs/fd_clip_vitb": MULTI_GPU,
    "torchrun --nproc_per_node=8 -m fdistill.cli.main distill --config configs/distill/clip_vit_base_300ep.yaml "
    "--data /path/to/imagenet/train": MULTI_GPU,
    "torchrun --nproc_per_node=8 --no-python fdistill distill --config configs/distill/clip_vit_base_300ep.yaml "
    "--data /path/to/imagenet/train": MULTI_GPU,
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=fd_clip_b --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 -m "
    "fdistill.cli.main distill --config configs/distill/clip_vit_base_300ep.yaml --data /path/to/imagenet/train "
    "--output /shared/runs/fd_clip_b": MULTI_GPU,
    "fdistill export runs/fd_clip_vit_base_300ep --format timm": NEEDS_GPU_RUN,
    "fdistill export runs/fd_clip_vit_base_300ep/checkpoints/ckpt_00012000.pt --format safetensors --output st/":
        NEEDS_GPU_RUN,
    # docs/diagnose.md
    "fdistill diagnose report --model timm:vit_base_patch16_clip_quickgelu_224.openai --label CLIP --model "
    "runs/fd_clip_vitb --label \"FD-CLIP\" --data /data/imagenet --images 128 --device cuda --out diag/clip_vs_fd":
        GPU_IN,
    "fdistill diagnose loss-landscape --model python:examples/cifar_resnet.py:resnet20 --label ResNet-20 "
    "--model-kwargs '{\"weights\": \"../shared/weights/resnet-cifar10/resnet20.safetensors\", \"feature_method\": "
    "\"forward_features\", \"img_size\": 32}' --model python:examples/cifar_resnet.py:resnet56 --label ResNet-56 "
    "--model-kwargs '{\"weights\": \"../shared/weights/resnet-cifar10/resnet56.safetensors\", \"feature_method\": "
    "\"forward_features\", \"img_size\": 32}' --data ../shared/data/cifar10-jpg-mini --images 200 --alphas 21 "
    "--out diag/resnets":
        LANDSCAPE,
    # docs/evaluate.md
    "fdistill finetune --model timm:vit_base_patch16_clip_quickgelu_224.openai --train /data/imagenet --config "
    "configs/finetune/vit_base.yaml --output runs/ft_clip_vitb": GPU_IN + " (and the OpenAI CLIP download)",
    "fdistill finetune --model runs/fd_clip_vitb --train /data/imagenet --config configs/finetune/vit_base.yaml "
    "--output runs/ft_fd_clip_vitb": GPU_IN,
    "fdistill linprobe --model runs/fd_clip_vitb --train /data/imagenet --config configs/linprobe/mae.yaml --output "
    "eval/lp_fd": GPU_IN,
    "fdistill zeroshot --model runs/fd_clip_vitb --text-model open_clip:ViT-B-16/openai --val /data/imagenet/val "
    "--output eval/zs_fd": GPU_IN,
    "fdistill zeroshot --model timm:vit_base_patch16_clip_quickgelu_224.openai --text-model "
    "open_clip:ViT-B-16/openai --val /data/imagenet/val --output eval/zs_timm": GPU_IN + " (and the OpenAI CLIP download)",
    "fdistill segprobe --config configs/segprobe/ade20k_linear.yaml --train /data/ADEChallengeData2016 --compare "
    "timm:vit_base_patch16_clip_quickgelu_224.openai runs/fd_clip_vitb --output eval/seg_ade20k":
        "ADE20K and a GPU-scale FD run (512 px, 40k iterations)",
    "torchrun --nproc_per_node=8 -m fdistill.cli.main finetune --model timm:vit_base_patch16_clip_quickgelu_224.openai "
    "--train /data/imagenet --config configs/finetune/vit_base.yaml --output runs/ft_clip_vitb data.batch_size=256":
        MULTI_GPU,
    "torchrun --nproc_per_node=8 -m fdistill.cli.main finetune --model runs/fd_clip_vitb --train /data/imagenet "
    "--config configs/finetune/vit_base.yaml --output runs/ft_fd_clip_vitb data.batch_size=256": MULTI_GPU,
    "fdistill distill --config r56_distill.yaml":
        "CPU-sized but long: 30 epochs of cifar10-jpg-mini (~2300 steps, tens of minutes on 2 cores); the same "
        "kind of run is tests/test_realdata_resnet_teacher.py",
    "fdistill finetune --config configs/finetune/tiny_cpu.yaml --train ../shared/data/cifar10-jpg-mini --output "
    "runs/table1_cpu --compare python:examples/cifar_resnet.py:resnet56 runs/fd_r56 --model-kwargs '{\"weights\": "
    "\"../shared/weights/resnet-cifar10/resnet56.safetensors\", \"feature_method\": \"forward_features\", "
    "\"img_size\": 32}' --model-kwargs '{}'": "needs runs/fd_r56 from the (skipped, long) command above",
    # docs/performance.md
    "python benchmarks/bench_distill.py --config cpu-vits-fp32 --baseline --json vits_fp32.json": BENCH_CPU,
    "python benchmarks/bench_distill.py --config cpu-vits-bf16 --baseline": BENCH_CPU,
    "python benchmarks/bench_distill.py --config gpu-vitb-bf16 --baseline --record": BENCH_GPU,
    "python benchmarks/bench_distill.py --config gpu-vitl-bf16 --grad-ckpt --baseline --record": BENCH_GPU,
    "python benchmarks/bench_distill.py --config gpu-vitb-bf16 --compile --channels-last": BENCH_GPU,
    "python benchmarks/bench_distill.py --config cpu-vits-fp32 --mask-ratio 0.5 --drop-masked --baseline": BENCH_CPU,
    "python benchmarks/bench_distill.py --config cpu-vits-fp32 --grad-ckpt": BENCH_CPU,
    "python benchmarks/bench_distill.py --config gpu-vitb-bf16 --data /data/imagenet/train --gpu-decode":
        BENCH_GPU + " (and ImageNet)",
    "python benchmarks/bench_masking.py --steps 300 --json masking.json":
        "minutes: 300 steps x 4 variants x 2 seeds with the ResNet-56 teacher; its numbers are in RESULTS.md",
    "bash benchmarks/gpu_check.sh": "needs a CUDA GPU; its --dry-run runs in tests/test_gpu_check.py",
    "bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check.json":
        "~1 min; tests/test_gpu_check.py runs exactly this (with its own --out)",
}

#: files a document tells the reader to write from one of its ```yaml blocks: name -> (document,
#: the text just before that block)
FILES_FROM_DOCS = {"cifar_resnet56.yaml": ("docs/teachers.md", "with a distillation config (`cifar_resnet56.yaml`)")}


# -- extraction -----------------------------------------------------------------------------------
@dataclass
class Command:
    doc: str
    line: int  # the ```bash line of its block
    text: str  # as bash reads it (continuations and here-documents kept)

    @property
    def key(self) -> str:
        return normalize(self.text)

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_]\w*)\1")


def normalize(text: str) -> str:
    """Whitespace collapsed, ``\\``-newline joins removed; a here-document by its first line."""
    first = text.split("\n", 1)[0]
    if _HEREDOC.search(first):
        text = first
    return " ".join(text.replace("\\\n", " ").split())


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` at a word start, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_blocks(text: str):
    """(line number of the opening fence, body lines) of every ```bash block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            yield i + 1, lines[i + 1:j]
            i = j
        i += 1


def split_commands(body: List[str]) -> List[str]:
    cmds, cur, heredoc = [], None, None
    for line in body:
        if heredoc is not None:
            cur.append(line)
            if line.strip() == heredoc:
                cmds.append("\n".join(cur))
                cur = heredoc = None
            continue
        s = strip_comment(line)
        if not s.strip():
            continue  # blank or comment-only (also between continuation lines' comments)
        cur = (cur or []) + [s]
        m = _HEREDOC.search(s)
        if m:
            heredoc = m.group(2)
        elif not s.endswith("\\"):
            cmds.append("\n".join(cur))
            cur = None
    if cur:
        cmds.append("\n".join(cur))
    return cmds


def doc_commands(doc: str) -> List[Command]:
    text = (REPO / doc).read_text()
    return [Command(doc, line, c) for line, body in bash_blocks(text) for c in split_commands(body)]


def all_commands() -> List[Command]:
    return [c for doc in DOCS for c in doc_commands(doc)]


def file_from_doc(name: str) -> str:
    doc, marker = FILES_FROM_DOCS[name]
    text = (REPO / doc).read_text()
    at = text.find(marker)
    assert at >= 0, f"{doc} no longer says {marker!r}: update FILES_FROM_DOCS"
    m = re.compile(r"```yaml\n(.*?)```", re.S).search(text, at)
    assert m, f"{doc}: no ```yaml block after {marker!r}"
    return m.group(1)


# -- tests ----------------------------------------------------------------------------------------
def test_extraction_joins_continuations_and_drops_comments():
    body = ["# a comment", "fdistill knn --model a \\", "    --train b   # where", "",
            "fdistill x 'has # inside'   # real comment", "   # a comment line under it",
            "cat > f.yaml <<'EOF'", "a: 1   # kept: inside the here-document", "EOF", "make test"]
    cmds = split_commands(body)
    assert cmds == ["fdistill knn --model a \\\n    --train b", "fdistill x 'has # inside'",
                    "cat > f.yaml <<'EOF'\na: 1   # kept: inside the here-document\nEOF", "make test"]
    assert normalize(cmds[0]) == "fdistill knn --model a --train b"
    assert normalize(cmds[2]) == "cat > f.yaml <<'EOF'"


def test_every_doc_command_is_classified():
    cmds = all_commands()
    assert len(cmds) > 30  # the extraction found the documents' commands
    both = sorted(set(RUN) & set(SKIP))
    assert not both, f"both run and skipped: {both}"
    unknown = [f"{c.where()}: {c.key}" for c in cmds if c.key not in RUN and c.key not in SKIP]
    assert not unknown, ("commands in the docs that this test neither runs nor skips; add each to RUN (it runs "
                         "here, offline, in about a minute) or to SKIP with the reason:\n  " + "\n  ".join(unknown))
    keys = {c.key for c in cmds}
    stale = sorted(k for k in list(RUN) + list(SKIP) if k not in keys)
    assert not stale, f"listed here but in no document any more (remove them): {stale}"
    for name in FILES_FROM_DOCS:
        assert file_from_doc(name).strip()


def _workdir(root: Path) -> Path:
    work = root / "work"
    work.mkdir(parents=True)
    for name in LINKS:
        (work / name).symlink_to(REPO / name)
    if SHARED.exists():
        (root / "shared").symlink_to(SHARED.resolve())  # ../shared from the working folder
    for name in FILES_FROM_DOCS:
        (work / name).write_text(file_from_doc(name))
    return work


def _needs_shared(cmd: Command) -> bool:
    spec = RUN[cmd.key]
    if "shared" in spec:
        return spec["shared"]
    return "../shared" in cmd.text


def _text(b) -> str:
    b = b or ""
    return (b.decode(errors="replace") if isinstance(b, bytes) else b).replace("\r", "\n")


@pytest.mark.slow
def test_doc_commands_run_as_written(tmp_path):
    work = _workdir(tmp_path)
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               # one intra-op thread: on busy shared cores these tiny models run 1.5-2.5x faster (conftest)
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PYTHONPATH", None)  # as a reader's shell: the installed fdistill, nothing of pytest's
    done, failures, report = set(), [], []
    t_all = time.perf_counter()
    for cmd in all_commands():
        if cmd.key in SKIP or cmd.key not in RUN:  # unclassified ones fail the test above
            continue
        spec = RUN[cmd.key]
        if cmd.key in done:
            report.append(f"  same as above  {cmd.where()}: {cmd.key[:90]}")
            continue
        if _needs_shared(cmd) and not SHARED.exists():
            report.append(f"  no ../shared   {cmd.where()}: {cmd.key[:90]}")
            continue
        if spec.get("long") and not os.environ.get("FDISTILL_DOCS_LONG"):
            report.append(f"  long (~{spec['long']} s): FDISTILL_DOCS_LONG=1 runs it  {cmd.where()}: {cmd.key[:90]}")
            continue
        t0 = time.perf_counter()
        try:
            p = subprocess.run(["bash", "-c", cmd.text], cwd=work, env=env, capture_output=True, text=True,
                               timeout=spec.get("timeout", 240))
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", _text(e.stdout), _text(e.stderr)
        dt = time.perf_counter() - t0
        done.add(cmd.key)
        report.append(f"  {dt:6.1f} s  rc {rc}  {cmd.where()}: {cmd.key[:90]}")
        problems = []
        if rc != spec.get("rc", 0):
            problems.append(f"exit status {rc}, expected {spec.get('rc', 0)}")
        for stream, text in (("stdout", out), ("stderr", err)):
            if spec.get(stream) and spec[stream] not in text:
                problems.append(f"{stream} lacks {spec[stream]!r}")
        if problems:
            tail = "\n".join(l for l in (out + "\n" + err).replace("\r", "\n").splitlines() if l.strip())
            tail = "\n".join(tail.splitlines()[-12:])
            failures.append(f"{cmd.where()}: {cmd.key}\n    " + "; ".join(problems) + "\n" + tail)
    print(f"doc commands ({time.perf_counter() - t_all:.0f} s):\n" + "\n".join(report))
    assert not failures, "documented commands that fail as written:\n\n" + "\n\n".join(failures)
