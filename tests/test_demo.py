"""The demo: the whole pipeline end to end at micro sizes, the report's contents and its checker,
and the honest summary (means, spreads and the verdict) worked out by hand."""
import json
import math
import shutil

import pytest

from fdistill.demo.pipeline import METRICS, STAGE_NAMES, DemoPlan, run_demo
from fdistill.demo.report import check_demo_report, summarize, text_table, verdict
from tests.conftest import make_colour_patches

MICRO = DemoPlan(clip_images=200, clip_steps=3, clip_batch=32, distill_images=200, distill_epochs=1,
                 finetune_train=200, finetune_epochs=1, eval_train=200, diagnose_images=8,
                 landscape_points=3, landscape_directions=1, seg_train=100, seg_epochs=1)


def _results(teacher, student, seeds=None):
    """A results dict as run_demo writes it, with the given fine-tuning top-1 per seed."""
    seeds = seeds or list(range(len(teacher)))
    per_seed = [{"seed": s, **{m: {"teacher": t, "student": st} for m in METRICS}}
                for s, t, st in zip(seeds, teacher, student)]
    return {"per_seed": per_seed, "seeds": seeds, "data": "synthetic"}


def test_summary_mean_and_sample_std_over_seeds():
    r = _results([10.0, 20.0, 30.0], [14.0, 22.0, 36.0])
    s = summarize(r)["finetune"]
    assert s["teacher"] == pytest.approx((20.0, 10.0))            # stdev of 10, 20, 30 (n - 1)
    assert s["student"] == pytest.approx((24.0, math.sqrt(((14 - 24) ** 2 + (22 - 24) ** 2 + (36 - 24) ** 2) / 2)))
    assert s["delta"] == pytest.approx((4.0, 2.0))                # deltas 4, 2, 6
    assert "4.0 ± 2.0" in text_table(r).replace("+", "")


def test_verdict_says_what_came_out():
    assert "did NOT improve" in verdict(_results([50.0], [45.0]))
    assert "better than its teacher by +5.0" in verdict(_results([45.0], [50.0]))
    # with several seeds, a difference inside the spread is called so, whichever sign it has
    assert "within the seed-to-seed spread" in verdict(_results([50.0, 50.0], [49.0, 53.0]))
    assert "ImageNet-1K" in verdict(_results([50.0], [45.0]))      # and where the paper measured


@pytest.fixture(scope="module")
def micro_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, plan=MICRO, seeds=1)
    return out, report


@pytest.mark.slow
def test_micro_demo_runs_every_stage_and_writes_a_whole_report(micro_demo, capsys):
    out, report = micro_demo
    assert report == out / "report.html"
    assert check_demo_report(out) == []
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["stages"]] == list(STAGE_NAMES)
    # every stage is an ordinary fdistill command, listed in the report
    page = report.read_text()
    for s in res["stages"]:
        assert s["command"].startswith("fdistill ")
    assert "fdistill distill --config" in page and "fdistill diagnose report" in page
    # the numbers come from the stages' own outputs
    ft = json.loads((out / "seed0" / "finetune" / "compare.json").read_text())["results"]
    assert res["per_seed"][0]["finetune"] == {"teacher": pytest.approx(ft[0]["top1"]),
                                               "student": pytest.approx(ft[1]["top1"])}
    seg = json.loads((out / "seed0" / "segprobe" / "compare.json").read_text())["results"]
    assert res["per_seed"][0]["segprobe"] == {"teacher": pytest.approx(seg[0]["miou"]),
                                               "student": pytest.approx(seg[1]["miou"])}
    assert res["metrics"] == list(METRICS) and "Linear segmentation mIoU" in page
    assert res["versions"]["torch"] and res["plan"]["clip_steps"] == MICRO.clip_steps


@pytest.mark.slow
def test_checker_finds_what_is_missing(micro_demo, tmp_path):
    out, _ = micro_demo
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    page = (broken / "report.html").read_text()
    # drop the loss-landscape figure and one stage's time, and change a number in the table
    start = page.index('<figure><img alt="Loss landscape')
    page = page[:start] + page[page.index("</figure>", start) + len("</figure>"):]
    start = page.index('<figure><img alt="Segmentation predictions of the FD student')
    page = page[:start] + page[page.index("</figure>", start) + len("</figure>"):]
    page = page.replace("<td>k-NN</td><td>", "<td>k-NN</td><td>x", 1)
    (broken / "report.html").write_text(page)
    res = json.loads((broken / "results.json").read_text())
    res["per_seed"][0]["zeroshot"]["student"] = float("nan")
    del res["per_seed"][0]["segprobe"]  # built-in data has masks: the segmentation row is required
    (broken / "results.json").write_text(json.dumps(res))
    problems = "\n".join(check_demo_report(broken))
    assert "segprobe teacher value is None" in problems
    assert "Loss landscape" in problems
    assert "Segmentation predictions of the FD student" in problems
    assert "Segmentation predictions of the CLIP teacher" not in problems
    assert "stage 'k-NN'" in problems
    assert "zeroshot student" in problems
    assert check_demo_report(tmp_path / "nothing") == [f"missing {tmp_path / 'nothing' / 'results.json'}",
                                                       f"missing {tmp_path / 'nothing' / 'report.html'}"]


def test_demo_data_is_checked_before_any_training(tmp_path):
    from fdistill.data.errors import DataError
    from fdistill.demo.pipeline import check_demo_data

    check_demo_data(None)
    check_demo_data("synthetic:500")
    with pytest.raises(DataError, match="not a folder"):
        run_demo(tmp_path / "out", data=str(tmp_path / "absent"), plan=MICRO)
    assert not (tmp_path / "out" / "seed0").exists()          # nothing ran
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ or val/"):
        check_demo_data(str(tmp_path / "flat"))
    for split, names in (("train", ("cat", "dog")), ("val", ("cat",))):
        for n in names:
            (tmp_path / "split" / split / n).mkdir(parents=True)
    with pytest.raises(DataError, match="same class sub-folders"):
        check_demo_data(str(tmp_path / "split"))


@pytest.mark.slow
def test_demo_on_a_user_folder_with_two_seeds_is_deterministic(tmp_path):
    """DATA=PATH: captions 'a photo of a {class}', every stage on the folder; seeds 0 and 1 are
    reported as mean and spread; and seed 0 of a rerun gives the same numbers (deterministic)."""
    data = tmp_path / "data"
    make_colour_patches(data / "train", 40, 0)     # 160 training images: more than one fine-tuning batch (128)
    make_colour_patches(data / "val", 10, 1)
    plan = DemoPlan(**{**MICRO.__dict__, "clip_batch": 16})
    out = tmp_path / "out"
    run_demo(out, plan=plan, seeds=2, data=str(data))
    assert check_demo_report(out) == []
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and len(res["per_seed"]) == 2
    assert res["data"] == str(data)
    # class folders have no label maps: no segmentation stage, row or number, and the report is still whole
    assert "segprobe" not in res["metrics"] and "segprobe" not in res["per_seed"][0]
    assert "segmentation probe" not in [s["name"] for s in res["stages"]]
    assert "Linear segmentation" not in (out / "report.html").read_text()
    assert "± " in (out / "report.html").read_text()
    assert json.loads((out / "seed0" / "knn" / "compare.json").read_text())["results"][0]["val"] == str(data)
    again = tmp_path / "again"
    run_demo(again, plan=plan, seeds=1, data=str(data))
    assert json.loads((again / "results.json").read_text())["per_seed"][0] == res["per_seed"][0]


@pytest.mark.slow
def test_demo_runs_again_into_the_same_folder(micro_demo, tmp_path):
    """`make demo` twice: the second run replaces the first one's seed folders (distillation would
    otherwise refuse a folder with checkpoints); a seed folder with anything else in it is refused
    before any training and left untouched."""
    out, _ = micro_demo
    first = json.loads((out / "results.json").read_text())
    (out / "seed3" / "fd").mkdir(parents=True)                  # left by an earlier run with SEEDS=4
    run_demo(out, plan=MICRO, seeds=1)
    assert check_demo_report(out) == []
    assert not (out / "seed3").exists()
    assert json.loads((out / "results.json").read_text())["per_seed"] == first["per_seed"]   # deterministic

    mine = tmp_path / "mine" / "seed0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous demo"):
        run_demo(tmp_path / "mine", plan=MICRO)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
