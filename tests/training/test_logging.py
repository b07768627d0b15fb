"""Per-step metrics reach the console (with ETA), the JSONL log and Weights & Biases in offline mode."""

from __future__ import annotations

import json

import pytest

from helpers import run_config, torchrun, write_indexed, write_yaml


def test_console_jsonl_and_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    prefix = write_indexed(tmp_path / "d", num_docs=100)
    cfg = run_config(tmp_path, prefix, **{"training.train_steps": 3, "training.eval_interval": 3,
                                          "logging.progress": True,
                                          "logging.wandb": {"enabled": True, "mode": "offline", "project": "t"}})
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path), "HOME": str(tmp_path)}
    p = torchrun(1, write_yaml(tmp_path / "run.yaml", cfg), env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("[t] step")]
    train_lines = [line for line in lines if "loss" in line and "eval" not in line]
    assert len(train_lines) == 3
    assert all("tok/s" in line and "ETA" in line and "gnorm" in line for line in train_lines)
    recs = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "mem_gb", "consumed_samples"):
        assert key in train[0], key
    assert train[-1]["consumed_samples"] == 3 * 8
    assert [r for r in recs if r["kind"] == "eval"]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directory"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["step"] == 3
