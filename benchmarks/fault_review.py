"""Fault-injection review of ``fdistill distill`` and ``fdistill finetune`` (issue 13): what a
cluster and a careless user do to a run, each case run for real in a subprocess, each with the
outcome it must have. Prints one line per case and the totals; ``--json FILE`` writes them.

    python -m benchmarks.fault_review [--only SUBSTRING] [--json benchmarks/fault_review.json]

*Faults* (kill -9, signals, corrupt or truncated checkpoints, concurrent runs, non-finite
losses, short shard epochs) survive when the run exits as it must and, where it resumes, ends
with the same weights as an uninterrupted run (``torch.equal``). *Bad inputs* (configs, files,
data, weights, crafted artifacts) are handled when the command exits with a one-line
``fdistill <command>: error: ...`` and no traceback, or, for undecodable images, skips and
counts them. Tiny CPU runs: the whole review takes about 10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
FD = [sys.executable, "-m", "fdistill.cli.main"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
DISTILL = ["distill", "--config", "configs/distill/tiny_cpu.yaml", "data.path=synthetic:512", "train.epochs=2",
           "train.ckpt_interval=4", "train.log_interval=4"]
FT_KW = '{"pretrained": false, "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}'
FINETUNE = ["finetune", "--config", "configs/finetune/tiny_cpu.yaml", "--model", "timm:vit_tiny_patch16_224",
            "--model-kwargs", FT_KW, "--train", "synthetic:256", "epochs=3", "ckpt_interval=3", "log_interval=2",
            "data.batch_size=32"]

Case = Callable[[Path], Tuple[bool, str]]
FAULTS: Dict[str, Case] = {}
BAD_INPUTS: Dict[str, Case] = {}


def fault(name):
    return lambda f: FAULTS.setdefault(name, f)


def bad_input(name):
    return lambda f: BAD_INPUTS.setdefault(name, f)


# -- running fdistill -------------------------------------------------------------------------------
def run(args: List[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(FD + [str(a) for a in args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def start(args: List[str], log: Path, group: bool = False) -> subprocess.Popen:
    return subprocess.Popen(FD + [str(a) for a in args], cwd=REPO, env=ENV, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=group)


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def clear_error(p: subprocess.CompletedProcess, command: str, *words: str) -> Tuple[bool, str]:
    """Exit 2 with an ``fdistill <command>: error:`` message (it may go on over a few lines, e.g.
    one per file), no traceback, naming ``words``."""
    prefix = f"fdistill {command}: error:"
    text = p.stderr
    message = text[text.find(prefix):] if prefix in text else ""
    ok = (p.returncode == 2 and bool(message) and "Traceback" not in text
          and all(w.lower() in message.lower() for w in words))
    return ok, " ".join(message.split())[:200] if ok else f"rc={p.returncode}: {text.strip()[-300:]}"


def ckpts(out: Path) -> List[Path]:
    return sorted((out / "checkpoints").glob("ckpt_*.pt"))


def weights(out: Path, key: str = "student") -> Dict[str, torch.Tensor]:
    ck = torch.load(ckpts(out)[-1], map_location="cpu", weights_only=True)
    return ck["model"][key]


def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_REF: Dict[str, Dict[str, torch.Tensor]] = {}


def reference(kind: str, root: Path) -> Dict[str, torch.Tensor]:
    """The uninterrupted run's final weights (computed once per review)."""
    if kind not in _REF:
        out = root / f"ref-{kind}"
        p = run((DISTILL if kind == "distill" else FINETUNE) + ["--output", out])
        assert p.returncode == 0, p.stderr[-2000:]
        _REF[kind] = weights(out, "student" if kind == "distill" else "model")
    return _REF[kind]


def resumed_equal(kind: str, out: Path, root: Path) -> Tuple[bool, str]:
    p = run((DISTILL if kind == "distill" else FINETUNE) + ["--output", out])
    if p.returncode != 0:
        return False, f"resume failed rc={p.returncode}: {p.stderr[-300:]}"
    ok = same(weights(out, "student" if kind == "distill" else "model"), reference(kind, root))
    return ok, "resumed: same weights as uninterrupted" if ok else "resumed, but the weights differ"


def kill_after_checkpoint(kind: str, out: Path, sig=signal.SIGKILL, group=False, extra=()) -> Tuple[int, str]:
    """Start the run (or resume it), wait for a new checkpoint, send ``sig``; (exit code, log)."""
    args = (DISTILL if kind == "distill" else FINETUNE) + [*extra, "--output", out]
    have = {c.name for c in ckpts(out)}
    proc = start(args, out.with_suffix(".log"), group=group)
    out.mkdir(parents=True, exist_ok=True)
    if not wait_for(lambda: bool({c.name for c in ckpts(out)} - have), proc):
        proc.kill()
        return -999, out.with_suffix(".log").read_text()[-500:]
    time.sleep(0.3)
    (os.killpg(proc.pid, sig) if group else proc.send_signal(sig))
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        return -998, "did not exit within 120 s of the signal"
    return rc, out.with_suffix(".log").read_text()


# -- faults -----------------------------------------------------------------------------------------
for _kind in ("distill", "finetune"):
    def _kill9(tmp, kind=_kind):
        rc, _ = kill_after_checkpoint(kind, tmp / "run")
        return resumed_equal(kind, tmp / "run", tmp.parent) if rc == -9 else (False, f"rc={rc}")

    def _sigterm(tmp, kind=_kind, sig=signal.SIGTERM):
        rc, log = kill_after_checkpoint(kind, tmp / "run", sig=sig)
        if rc != 0 or f"stopped by {sig.name}" not in log:
            return False, f"rc={rc} {log[-300:]}"
        return resumed_equal(kind, tmp / "run", tmp.parent)

    def _sigusr1(tmp, kind=_kind):
        return _sigterm(tmp, kind, signal.SIGUSR1)

    def _group_sigterm_workers(tmp, kind=_kind):
        extra = ["data.num_workers=2"]
        rc, log = kill_after_checkpoint(kind, tmp / "run", sig=signal.SIGTERM, group=True, extra=extra)
        ok = rc == 0 and "stopped by SIGTERM" in log and "killed by signal" not in log
        return ok, "exit 0 with a pre-emption checkpoint" if ok else f"rc={rc} {log[-300:]}"

    def _sigint(tmp, kind=_kind):
        rc, _ = kill_after_checkpoint(kind, tmp / "run", sig=signal.SIGINT)
        return resumed_equal(kind, tmp / "run", tmp.parent) if rc in (130, 0) else (False, f"rc={rc}")

    def _truncated_newest(tmp, kind=_kind):
        out = tmp / "run"
        rc, _ = kill_after_checkpoint(kind, out)
        cs = ckpts(out)
        if len(cs) < 2:  # make sure there is an older one to fall back to
            rc, _ = kill_after_checkpoint(kind, out)
            cs = ckpts(out)
        cs[-1].write_bytes(cs[-1].read_bytes()[: cs[-1].stat().st_size // 2])
        return resumed_equal(kind, out, tmp.parent)

    def _bitflip_newest(tmp, kind=_kind):
        out = tmp / "run"
        kill_after_checkpoint(kind, out)
        cs = ckpts(out)
        if len(cs) < 2:
            kill_after_checkpoint(kind, out)
            cs = ckpts(out)
        data = bytearray(cs[-1].read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        cs[-1].write_bytes(bytes(data))
        return resumed_equal(kind, out, tmp.parent)

    def _all_corrupt(tmp, kind=_kind):
        out = tmp / "run"
        kill_after_checkpoint(kind, out)
        for c in ckpts(out):
            c.write_bytes(b"garbage")
        before = sorted(c.name for c in ckpts(out))
        p = run((DISTILL if kind == "distill" else FINETUNE) + ["--output", out])
        ok, msg = clear_error(p, kind)
        kept = sorted(c.name for c in ckpts(out)) == before
        return ok and kept, msg + ("" if kept else " (checkpoints deleted)")

    def _partial_write(tmp, kind=_kind):
        out = tmp / "run"
        kill_after_checkpoint(kind, out)
        newest = ckpts(out)[-1]
        junk = newest.with_name(f".ckpt_99999999.pt.{12345}.tmp")
        junk.write_bytes(newest.read_bytes()[:1000])  # what a kill -9 inside the atomic write leaves
        return resumed_equal(kind, out, tmp.parent)

    def _concurrent(tmp, kind=_kind):
        out = tmp / "run"
        longer = ["train.epochs=200"] if kind == "distill" else ["epochs=200"]
        args = (DISTILL if kind == "distill" else FINETUNE) + longer + ["--output", out]
        proc = start(args, tmp / "first.log")
        out.mkdir(parents=True, exist_ok=True)
        wait_for(lambda: bool(ckpts(out)), proc)  # the first run is training
        second = run(args)
        ok, msg = clear_error(second, kind, "another fdistill run")
        proc.send_signal(signal.SIGTERM)
        first_rc = proc.wait(timeout=120)
        log = (tmp / "first.log").read_text()
        first_ok = first_rc == 0 and "stopped by SIGTERM" in log
        return ok and first_ok, (f"second refused ({msg[:80]}); the first went on and checkpointed at its stop"
                                 if ok and first_ok else f"second: {msg}; first rc={first_rc}")

    def _changed_recipe(tmp, kind=_kind):
        out = tmp / "run"
        kill_after_checkpoint(kind, out)
        extra = ["optim.base_lr=3e-3"] if kind == "distill" else ["optim.lr=1e-2"]
        p = run((DISTILL if kind == "distill" else FINETUNE) + [*extra, "--output", out])
        return clear_error(p, kind)  # distill names the keys that differ, finetune "another recipe"

    for _name, _fn in (("kill -9 after a checkpoint, resume", _kill9), ("SIGTERM, resume", _sigterm),
                       ("SIGUSR1, resume", _sigusr1), ("SIGTERM to the process group, 2 loader workers",
                                                       _group_sigterm_workers),
                       ("Ctrl-C (SIGINT), resume", _sigint), ("truncated newest checkpoint, resume", _truncated_newest),
                       ("bit-flipped newest checkpoint, resume", _bitflip_newest),
                       ("every checkpoint corrupt", _all_corrupt), ("left-over partial write, resume", _partial_write),
                       ("a second run in the same folder", _concurrent),
                       ("resume with another recipe", _changed_recipe)):
        FAULTS[f"{_kind}: {_name}"] = _fn


@fault("distill: non-finite losses (lr 1e30)")
def _nonfinite(tmp):
    p = run(DISTILL + ["optim.base_lr=1e30", "train.max_nonfinite=3", "--output", tmp / "run"])
    return clear_error(p, "distill", "non-finite")


@fault("distill: tar shards shorter than samples_per_epoch")
def _short_shards(tmp):
    sys.path.insert(0, str(REPO))
    from tests.test_data_shards import write_shards

    pattern = write_shards(tmp, n_shards=2, per_shard=12, bad=(3, 17))
    t0 = time.time()
    p = run(["distill", "--config", "configs/distill/tiny_cpu.yaml", f"data.path={pattern}",
             "data.samples_per_epoch=24", "data.batch_size=4", "student.img_size=16", "train.epochs=3",
             "--output", tmp / "run"], timeout=300)
    ok = p.returncode == 0 and time.time() - t0 < 300
    return ok, f"finished in {time.time() - t0:.0f} s" if ok else f"rc={p.returncode} {p.stderr[-300:]}"


# -- bad inputs -------------------------------------------------------------------------------------
def _distill_error(*overrides, words=()):
    def case(tmp):
        return clear_error(run(DISTILL + [*overrides, "--output", tmp / "run"]), "distill", *words)
    return case


def _finetune_error(*overrides, words=()):
    def case(tmp):
        return clear_error(run(FINETUNE + [*overrides, "--output", tmp / "run"]), "finetune", *words)
    return case


for _name, _over, _words in (
        ("unknown config key", ["train.epoch=3"], ["train.epoch"]),
        ("non-finite lr (.inf)", ["optim.base_lr=.inf"], ["finite"]),
        ("nan weight decay", ["optim.weight_decay=.nan"], ["finite"]),
        ("batch size 0", ["data.batch_size=0"], ["batch_size"]),
        ("negative epochs", ["train.epochs=-1"], ["epochs"]),
        ("wrong type (epochs=abc)", ["train.epochs=abc"], ["epochs"]),
        ("missing data folder", ["data.path=/nonexistent/images"], ["/nonexistent/images"]),
        ("unknown teacher", ["teacher.spec=timm:not_a_model_name"], ["not_a_model_name"]),
        ("unknown teacher source", ["teacher.spec=nosuch:model"], ["nosuch"]),
        ("missing teacher checkpoint", ["teacher.kwargs.checkpoint=/nonexistent/w.pth"], ["/nonexistent/w.pth"]),
        ("student image size not divisible by patch", ["student.img_size=30"], []),
        ("mask ratio out of range", ["distill.mask_ratio=1.5"], ["mask"]),
):
    BAD_INPUTS[f"distill: {_name}"] = _distill_error(*_over, words=_words)

for _name, _over, _words in (
        ("unknown config key", ["optim.lrr=1"], ["optim.lrr"]),
        ("non-finite lr", ["optim.lr=.inf"], ["finite"]),
        ("batch larger than the data", ["data.batch_size=4096"], ["batch"]),
        ("unknown model", ["--model", "timm:not_a_model_name"], ["not_a_model_name"]),
        ("missing training folder", ["--train", "/nonexistent/train"], ["/nonexistent/train"]),
        ("resume from a missing file", ["--resume", "/nonexistent/ckpt.pt"], ["not found"]),
):
    BAD_INPUTS[f"finetune: {_name}"] = _finetune_error(*_over, words=_words)


@bad_input("distill: config file missing")
def _missing_config(tmp):
    return clear_error(run(["distill", "--config", tmp / "nope.yaml", "--output", tmp / "run"]), "distill", "nope.yaml")


@bad_input("distill: YAML syntax error")
def _yaml_error(tmp):
    cfg = tmp / "bad.yaml"
    cfg.write_text("train:\n  epochs: [1, 2\n")
    return clear_error(run(["distill", "--config", cfg, "--output", tmp / "run"]), "distill", "bad.yaml")


@bad_input("distill: empty image folder")
def _empty_folder(tmp):
    (tmp / "imgs").mkdir()
    return clear_error(run(DISTILL + [f"data.path={tmp / 'imgs'}", "--output", tmp / "run"]), "distill")


def _bad_images(root: Path) -> int:
    """Good images plus every kind of bad file; returns how many cannot be decoded."""
    from PIL import Image

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"good{i:02d}.jpg")
    Image.fromarray((torch.rand(32, 32, generator=g) * 65535).to(torch.int32).numpy().astype("uint16")).save(
        root / "grey16.png")  # decodable: 16-bit grey
    Image.new("CMYK", (32, 32), (10, 20, 30, 40)).save(root / "cmyk.jpg")  # decodable
    Image.new("P", (32, 32)).save(root / "palette.png")  # decodable
    Image.new("RGBA", (1, 1)).save(root / "tiny.png")  # decodable, 1 x 1
    good = (root / "good00.jpg").read_bytes()
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "text.jpg").write_text("not an image")
    (root / "html.png").write_text("<html>404</html>")
    return 4


@bad_input("distill: undecodable images among good ones are skipped and counted")
def _corrupt_images(tmp):
    n_bad = _bad_images(tmp / "imgs")
    out = tmp / "run"
    p = run(["distill", "--config", "configs/distill/tiny_cpu.yaml", f"data.path={tmp / 'imgs'}",
             "data.batch_size=4", "train.epochs=1", "train.log_interval=1", "--output", out])
    if p.returncode != 0:
        return False, f"rc={p.returncode} {p.stderr[-300:]}"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(r.get("skipped_images", 0) for r in recs)
    return skipped == n_bad, f"{skipped} of {n_bad} bad files skipped and counted, the run finished"


@bad_input("distill: a folder of only undecodable images")
def _only_bad(tmp):
    (tmp / "imgs").mkdir()
    for i in range(8):
        (tmp / "imgs" / f"x{i}.jpg").write_text("nope")
    return clear_error(run(DISTILL + [f"data.path={tmp / 'imgs'}", "data.batch_size=4", "--output", tmp / "run"]),
                       "distill")


def _teacher_file(tmp: Path, mutate) -> Path:
    import timm
    from safetensors.torch import save_file

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, embed_dim=96,
                          num_heads=3)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    mutate(sd)
    path = tmp / "teacher.safetensors"
    save_file(sd, str(path))
    return path


@bad_input("distill: teacher weights with NaN")
def _nan_teacher(tmp):
    path = _teacher_file(tmp, lambda sd: sd["blocks.0.attn.qkv.weight"].fill_(float("nan")))
    return clear_error(run(DISTILL + [f"teacher.kwargs.checkpoint={path}", "--output", tmp / "run"]), "distill",
                       "non-finite")


@bad_input("distill: teacher weights of the wrong shape")
def _wrong_shape_teacher(tmp):
    path = _teacher_file(tmp, lambda sd: sd.__setitem__("blocks.0.attn.qkv.weight", torch.zeros(5, 5)))
    return clear_error(run(DISTILL + [f"teacher.kwargs.checkpoint={path}", "--output", tmp / "run"]), "distill",
                       "blocks.0.attn.qkv.weight")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@bad_input("distill: a pickle that runs code as teacher weights")
def _pickle_teacher(tmp):
    marker = tmp / "pwned"
    path = tmp / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Exploit(marker)}, f)
    p = run(DISTILL + [f"teacher.kwargs.checkpoint={path}", "--output", tmp / "run"])
    ok, msg = clear_error(p, "distill")
    return ok and not marker.exists(), msg + (" (code ran!)" if marker.exists() else "")


@bad_input("export: a file that is not a checkpoint")
def _export_garbage(tmp):
    (tmp / "ckpt.pt").write_bytes(b"PK\x03\x04 garbage")
    return clear_error(run(["export", tmp / "ckpt.pt", "--output", tmp / "exp"]), "export")


@bad_input("export: a fine-tuning checkpoint")
def _export_finetune(tmp):
    p = run(FINETUNE + ["max_steps=2", "--output", tmp / "ft"])
    if p.returncode != 0:
        return False, p.stderr[-300:]
    return clear_error(run(["export", ckpts(tmp / "ft")[-1], "--output", tmp / "exp"]), "export", "fdistill finetune")


@bad_input("zeroshot: a run folder whose checkpoint records code to run")
def _crafted_run(tmp):
    from fdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    out = tmp / "run"
    p = run(["distill", "--config", "configs/distill/tiny_cpu.yaml", "train.max_steps=2", "data.path=synthetic:128",
             "--output", out])
    if p.returncode != 0:
        return False, p.stderr[-300:]
    marker = tmp / "pwned"
    ck = load_checkpoint(ckpts(out)[-1])
    ck["teacher"]["spec"], ck["teacher"]["kwargs"] = "python:subprocess:run", {"args": ["touch", str(marker)]}
    save_checkpoint(ckpts(out)[-1], ck)
    p = run(["zeroshot", "--model", out, "--val", "synthetic:20", "--output", tmp / "zs"])
    ok, msg = clear_error(p, "zeroshot", "--trust-recorded-spec")
    return ok and not marker.exists(), msg + (" (code ran!)" if marker.exists() else "")


@bad_input("finetune: train and val classes differ")
def _classes_differ(tmp):
    from PIL import Image

    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for c in classes:
            (tmp / "d" / split / c).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(tmp / "d" / split / c / f"{i}.png")
    p = run(FINETUNE[:-1] + ["data.batch_size=4", "--train", tmp / "d", "--output", tmp / "run"])  # noqa: E501
    return clear_error(p, "finetune", "classes")


# -- the review -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import fdistill
    from tqdm.auto import tqdm

    results = []
    cases = [("fault", n, f) for n, f in FAULTS.items()] + [("bad input", n, f) for n, f in BAD_INPUTS.items()]
    cases = [c for c in cases if args.only in c[1]]
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="fdistill-review-") as root:
        for i, (family, name, fn) in enumerate(tqdm(cases, desc="fault review", unit="case", dynamic_ncols=True)):
            tmp = Path(root) / f"case{i:03d}"
            tmp.mkdir()
            t0 = time.time()
            try:
                ok, detail = fn(tmp)
            except Exception as e:  # noqa: BLE001 - a case that crashes the harness counts as not handled
                ok, detail = False, f"harness: {type(e).__name__}: {e}"
            results.append({"family": family, "case": name, "ok": bool(ok), "detail": detail,
                            "seconds": round(time.time() - t0, 1)})
            tqdm.write(f"{'ok  ' if ok else 'FAIL'} [{family}] {name}: {detail}")
    faults = [r for r in results if r["family"] == "fault"]
    bads = [r for r in results if r["family"] == "bad input"]
    summary = {"faults_tried": len(faults), "faults_survived": sum(r["ok"] for r in faults),
               "bad_inputs_tried": len(bads), "bad_inputs_handled": sum(r["ok"] for r in bads),
               "minutes": round((time.time() - t_start) / 60, 1), "fdistill": fdistill.__version__,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores"}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "cases": results}, indent=2) + "\n")
    return 0 if summary["faults_tried"] == summary["faults_survived"] and \
        summary["bad_inputs_tried"] == summary["bad_inputs_handled"] else 1


if __name__ == "__main__":
    sys.exit(main())
