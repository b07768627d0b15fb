"""Checkpoints: a run killed by SIGTERM and resumed equals an uninterrupted run bit for bit; a TP=2
checkpoint resumes at TP=1; continued pretraining starts from the loaded weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, read_losses, run_config, torchrun, write_indexed, write_yaml

# Long enough that the SIGTERM, sent once two steps are logged, lands mid-run even when the test
# process is descheduled for a few seconds on a loaded machine (a tiny step takes ~20 ms).
STEPS = 40
EVAL = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_data")
    return {
        "a": write_indexed(tmp / "a", pattern="counting", num_docs=300, seed=1),
        "b": write_indexed(tmp / "b", pattern="random", num_docs=300, seed=2),
        "valid": write_indexed(tmp / "valid", pattern="counting", num_docs=100, seed=3),
    }


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = run_config(tmp, data["a"], **{"training.train_steps": STEPS, "training.eval_interval": EVAL,
                                         "data.valid_blend": [{"prefix": data["valid"]}]})
    torchrun(1, write_yaml(tmp / "run.yaml", cfg))
    return tmp / "run"


def test_sigterm_then_resume_is_bit_identical(tmp_path, data, uninterrupted):
    cfg = run_config(tmp_path, data["a"], **{"training.train_steps": STEPS, "training.eval_interval": EVAL,
                                             "data.valid_blend": [{"prefix": data["valid"]}]})
    config = write_yaml(tmp_path / "run.yaml", cfg)
    run_dir = tmp_path / "run"
    log = run_dir / "logs" / "train.jsonl"
    cmd = [sys.executable, "-m", "megatron_align.training.cli", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and sum(1 for r in log.read_text().splitlines() if '"train"' in r) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled: " + proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 99, out[-3000:]
    saved = json.loads((run_dir / "summary.json").read_text())
    stopped_at = saved["step"]
    assert 2 <= stopped_at < STEPS, f"the run should stop mid-way, stopped at {stopped_at}"
    assert (run_dir / "checkpoints" / f"step_{stopped_at:07d}" / "complete.json").is_file()

    # Resume: the same command picks up the latest checkpoint.
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout

    ref = [r for r in _records(uninterrupted) if r["kind"] == "train"]
    got = [r for r in _records(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    # Same data order (consumed samples) and bit-identical losses / grad norms / learning rates.
    for key in ("consumed_samples", "loss", "grad_norm", "lr"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    assert read_losses(run_dir, "eval", "eval_loss") == read_losses(uninterrupted, "eval", "eval_loss")


def test_incomplete_checkpoint_is_never_latest(tmp_path):
    from megatron_align.training.checkpoint import latest_checkpoint

    save = tmp_path / "ckpts"
    (save / "step_0000004").mkdir(parents=True)
    (save / "step_0000004" / "complete.json").write_text("{}")
    (save / "step_0000008").mkdir()  # killed while writing: no marker
    (save / ".tmp.step_0000012").mkdir()
    assert latest_checkpoint(save).name == "step_0000004"


def test_tp2_checkpoint_resumes_at_tp1(tmp_path, data):
    over = {"training.train_steps": 6, "checkpoint.save_interval": 3}
    tp2 = run_config(tmp_path / "tp2", data["a"], **over, **{"parallel.tensor": 2})
    torchrun(2, write_yaml(tmp_path / "tp2.yaml", tp2))
    ref = read_losses(tmp_path / "tp2" / "run")

    # Continue the TP=2 run's step-3 checkpoint under TP=1.
    ckpts = tmp_path / "tp2" / "run" / "checkpoints"
    tp1_dir = tmp_path / "tp1" / "run" / "checkpoints"
    tp1_dir.mkdir(parents=True)
    os.rename(ckpts / "step_0000003", tp1_dir / "step_0000003")
    tp1 = run_config(tmp_path / "tp1", data["a"], **over)
    p = torchrun(1, write_yaml(tmp_path / "tp1.yaml", tp1))
    assert "resumed from" in p.stdout
    got = read_losses(tmp_path / "tp1" / "run")
    assert len(got) == 3
    np.testing.assert_allclose(got, ref[3:], rtol=2e-5, atol=2e-5)


def test_continued_pretraining_starts_from_loaded_weights(tmp_path, data, uninterrupted):
    """A new run with another blend, initialised from a finished run: its first eval (step 0) on the
    same validation data equals the source run's last eval."""
    source_last_eval = read_losses(uninterrupted, "eval", "eval_loss")[-1]
    cfg = run_config(tmp_path, data["b"], **{
        "training.train_steps": 2, "training.eval_interval": 2,
        "data.valid_blend": [{"prefix": data["valid"]}],
        "init.checkpoint": str(uninterrupted / "checkpoints"),
        "scheduler.style": "wsd", "optimizer.lr": 1e-3})
    torchrun(1, write_yaml(tmp_path / "cpt.yaml", cfg))
    evals = _records(tmp_path / "run")
    first = [r for r in evals if r["kind"] == "eval"][0]
    assert first["step"] == 0
    assert first["eval_loss"] == pytest.approx(source_last_eval, abs=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["initialised_from"].endswith(f"step_{STEPS:07d}")


def test_midtraining_with_longer_sequences(tmp_path, data, uninterrupted):
    """The paper's midtraining grows the sequence length: a run initialised from a checkpoint trained
    at 32 tokens continues at 128 (RoPE has no position table to resize)."""
    cfg = run_config(tmp_path, data["b"], **{
        "training.train_steps": 2, "training.seq_length": 128, "training.global_batch_size": 4,
        "init.checkpoint": str(uninterrupted / "checkpoints"), "scheduler.warmup_steps": 0})
    torchrun(1, write_yaml(tmp_path / "mid.yaml", cfg))
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 2 and all(np.isfinite(losses))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["initialised_from"].endswith(f"step_{STEPS:07d}")


def test_a_phase_cut_in_two_follows_one_lr_schedule(tmp_path, data, uninterrupted):
    """A final-fraction insertion cuts a phase in two runs with a data switch between them. Both
    follow the phase's schedule (scheduler.total_steps); the second, started from the first's
    checkpoint with init.load_optimizer, goes on where the first stopped."""
    base = {"training.eval_interval": EVAL, "data.valid_blend": [{"prefix": data["valid"]}],
            "scheduler.total_steps": STEPS}
    first = run_config(tmp_path / "p1", data["a"], **base, **{"training.train_steps": 5})
    torchrun(1, write_yaml(tmp_path / "p1.yaml", first))
    # Part one is the uninterrupted run's first five steps, learning rates and losses alike.
    ref = [r for r in _records(uninterrupted) if r["kind"] == "train"]
    got1 = [r for r in _records(tmp_path / "p1" / "run") if r["kind"] == "train"]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in got1] == [r[key] for r in ref[:5]], key

    init = {"init.checkpoint": str(tmp_path / "p1" / "run" / "checkpoints"), "init.load_optimizer": True}
    second = run_config(tmp_path / "p2", data["b"], **base, **init, **{"training.train_steps": STEPS - 5})
    torchrun(1, write_yaml(tmp_path / "p2.yaml", second))
    got2 = [r for r in _records(tmp_path / "p2" / "run") if r["kind"] == "train"]
    assert [r["lr"] for r in got2] == [r["lr"] for r in ref[5:]]  # no second warmup, same decay
    assert got2[-1]["lr"] == pytest.approx(run_config(tmp_path, data["a"])["optimizer"]["min_lr"])

    # A continuation that would run past its schedule is refused before training.
    over = run_config(tmp_path / "p3", data["b"], **{**base, "scheduler.total_steps": STEPS - 1}, **init,
                      **{"training.train_steps": STEPS - 5})
    p = torchrun(1, write_yaml(tmp_path / "p3.yaml", over), check=False)
    assert p.returncode != 0 and f"would run past the schedule's {STEPS - 1}" in p.stdout + p.stderr
