"""What a user watches: the sweep's status lines and the run's bar (progress.py), on real files."""

import io
import json

from loqt_ray import progress


def _append(path, *steps):
    with open(path, "a") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "train_loss": 5.0, "tokens_per_s": 100.0}) + "\n")


def test_run_bar_follows_metrics_through_a_restart_and_shows_the_last_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _append(metrics, 1, 2)  # an earlier command's steps, resumed from its checkpoint at 2
    bar = progress.RunProgress(tmp_path, 10, "run", True, io.StringIO(), start=2)
    bar.every_s = 3600  # this test ticks by hand; the thread ticks only at exit
    with bar:
        assert bar.bar.n == 2
        _append(metrics, 3, 4)
        bar.tick()
        assert bar.bar.n == 4
        metrics.write_text("")  # a restart cut the steps it will redo
        bar.tick()
        _append(metrics, 3, 4, 5)
        with open(metrics, "a") as f:
            f.write('{"step": 6, "train')  # half-written by rank 0: waits for its end
    assert bar.bar.n == 5  # the tick at exit read what was written last


def test_a_resume_that_cuts_the_log_starts_the_bar_at_the_checkpoint_not_past_it_or_at_step_1(tmp_path):
    """A run stopped at step 9 with its checkpoint at 8: the rerun's rank 0 cuts the log to step 8.
    The bar once went from 9 back to 1 and counted up through every kept step, then (started at
    the log's 9) back to 8 with a negative rate; both seen in a run's output. It starts at 8."""
    metrics = tmp_path / "metrics.jsonl"
    _append(metrics, *range(1, 10))
    shown = io.StringIO()
    bar = progress.RunProgress(tmp_path, 40, "run", True, shown, start=8)
    bar.every_s = 3600
    with bar:
        assert bar.bar.n == 8
        metrics.write_text("")
        _append(metrics, *range(1, 9))  # what the resumed run's rank 0 kept
        before = len(shown.getvalue())
        bar.tick()
        assert bar.bar.n == 8
        # as it reads 17 s in, before any step of this command's (tqdm's rate: steps since the start)
        assert "-" not in bar.bar.format_meter(**{**bar.bar.format_dict, "elapsed": 17})
        _append(metrics, 9, 10)
        bar.tick()
        assert bar.bar.n == 10
        after_cut = shown.getvalue()[before:]
    assert " 8/40" in after_cut and " 1/40" not in after_cut and "-0." not in after_cut


def test_sweep_display_counts_trials_tokens_and_the_best():
    stream = io.StringIO()
    display = progress.SweepProgress("demo", 6, 100_000, stream)
    display.update({"a": ("running", 20_000, float("inf"))})
    assert (
        "0 done, 1 running, 0 stopped early, 0 failed of 6 trials | 20k of 600k tokens" in stream.getvalue()
    )
    assert "no evaluation yet" in stream.getvalue()
    display.update({"a": ("running", 40_000, 300.0)})  # within LOG_EVERY_S: nothing new printed
    assert stream.getvalue().count("\n") == 1
    states = {"a": ("completed", 100_000, 240.5), "b": ("stopped early", 40_000, 400.0),
              "c": ("failed", 0, float("inf")), "d": ("running", 60_000, 260.0)}  # fmt: skip
    display.event("trial b stopped early by ASHA")
    display.update(states, force=True)
    last = stream.getvalue().splitlines()[-1]
    assert "demo: 1 done, 1 running, 1 stopped early, 1 failed of 6 trials | 200k of 600k tokens" in last
    assert "best val ppl 240.50 (a)" in last and "elapsed, at most ~" in last
    assert "demo: trial b stopped early by ASHA" in stream.getvalue()
