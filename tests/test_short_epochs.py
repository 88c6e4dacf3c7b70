"""Tar-shard epochs shorter than ``data.samples_per_epoch`` says (bad samples dropped, uneven
shards): the run moves on to the next epoch from its beginning, finishes in bounded time, resumes
bit-exactly, and an epoch with no batch at all is a clear error (issue 13, item 1: the run used to
re-enter the short epoch as a mid-epoch resume, get zero batches forever and ignore SIGTERM)."""
import json
import signal
from contextlib import contextmanager

import pytest
from fdistill.engine import RunError, distill, load_checkpoint
from fdistill.engine.checkpoint import list_checkpoints
from tests.test_data_shards import write_shards
from tests.test_engine_distill import assert_same_training_state, tiny_cfg

pytest.importorskip("webdataset")
pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: the bug this file reproduces was an endless loop."""
    def _raise(signum, frame):
        raise TimeoutError(f"the run did not finish within {seconds} s")

    prev = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, prev)


def shard_cfg(out, pattern, *extra):
    # 24 samples declared, 2 of them broken: 22 readable -> 5 batches of 4 (drop_last), not 6
    return tiny_cfg(out, f"data.path={pattern}", "data.samples_per_epoch=24", "data.batch_size=4",
                    "student.img_size=16", *extra)


def test_short_epochs_finish_in_bounded_time_and_resume_exactly(tmp_path, caplog):
    pattern = write_shards(tmp_path, n_shards=4, per_shard=6, bad=(3, 17))
    with time_limit(120):
        ref = distill(shard_cfg(tmp_path / "ref", pattern))  # 3 epochs x 6 declared steps = 18 steps
    assert ref.complete and ref.step == 18
    recs = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
            if '"step"' in line]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps))  # no step logged twice
    assert "epoch 0 ended after 5 of 6 steps" in caplog.text
    ck = load_checkpoint(list_checkpoints(tmp_path / "ref")[-1])
    # 18 steps of 5 per real epoch: epochs 0-2 full (15), 3 steps into epoch 3 -- explicit state
    assert (ck["progress"]["epoch"], ck["progress"]["step_in_epoch"]) == (3, 3)

    out = tmp_path / "run"
    with time_limit(120):
        first = distill(shard_cfg(out, pattern, "train.max_steps=7"))  # stops 2 steps into epoch 1
        ck7 = load_checkpoint(list_checkpoints(out)[-1])
        assert (ck7["progress"]["epoch"], ck7["progress"]["step_in_epoch"]) == (1, 2)
        second = distill(shard_cfg(out, pattern))  # --resume auto to the end
    assert first.step == 7 and second.step == 18
    assert_same_training_state(load_checkpoint(list_checkpoints(out)[-1]), ck)


def test_an_epoch_without_any_batch_is_a_clear_error(tmp_path):
    pattern = write_shards(tmp_path, n_shards=1, per_shard=3)  # 3 samples: not one batch of 4
    with time_limit(60), pytest.raises(RunError, match=r"epoch 0 yielded no batch of 4.*data\.samples_per_epoch=24"):
        distill(shard_cfg(tmp_path / "run", pattern))


def test_stopped_at_the_short_end_of_an_epoch_resumes_into_the_next(tmp_path):
    """SIGTERM during the last real batch of a short epoch: the checkpoint says "epoch 0, 5 steps
    done" (the loop cannot know the epoch is over before asking for a 6th batch); the resume finds
    the epoch empty, moves on to epoch 1 from its start and ends as the uninterrupted run."""
    import os

    pattern = write_shards(tmp_path, n_shards=4, per_shard=6, bad=(3, 17))
    sent = []

    def on_batch(step, batch):
        if step == 5 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    with time_limit(120):
        ref = distill(shard_cfg(tmp_path / "ref", pattern, "train.max_steps=9"))
        r = distill(shard_cfg(tmp_path / "run", pattern, "train.max_steps=9"), on_batch=on_batch)
        assert r.stopped_by == "SIGTERM" and r.step == 5
        ck = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
        assert (ck["progress"]["epoch"], ck["progress"]["step_in_epoch"]) == (0, 5)
        done = distill(shard_cfg(tmp_path / "run", pattern, "train.max_steps=9"))
    assert ref.step == done.step == 9
    assert_same_training_state(load_checkpoint(list_checkpoints(tmp_path / "run")[-1]),
                               load_checkpoint(list_checkpoints(tmp_path / "ref")[-1]))
