"""The tiny study's graph submitted to the local Slurm cluster completes (reduced: one condition,
no post-training, 10 steps, one format), every stage a Slurm job chained with afterok."""

from __future__ import annotations

import json

import pytest
import yaml

from slurm.study_cli import status_main, submit_main

from test_tiny_study import short_tiny  # noqa: E402  (same folder, on sys.path under pytest's rootdir)


@pytest.mark.slurm
def test_reduced_tiny_study_on_local_slurm(tmp_path, slurm_cluster, wait_for_jobs, submission, capsys):
    p = short_tiny(tmp_path)
    raw = yaml.safe_load(p.read_text())
    raw["data"]["phases"][0]["tokens"] = 10 * 16 * 128
    raw["data"]["conditions"] = {"unfiltered": raw["data"]["conditions"]["unfiltered"]}
    raw["sft"]["enabled"] = raw["dpo"]["enabled"] = False
    raw["eval"].update(personas=["none"], formats=["cue0-ab"])
    p.write_text(yaml.safe_dump(raw))
    prof = json.loads(json.dumps(slurm_cluster))
    prof["resources"]["cpu"].update(mem="3G", time="00:20:00", cpus_per_task=2)
    cp = tmp_path / "cluster.yaml"
    cp.write_text(yaml.safe_dump(prof))
    wd = tmp_path / "work"
    assert submit_main([str(p), "--workdir", str(wd), "--cluster", str(cp)]) == 0
    jobs = {n: s["job_id"] for n, s in submission(wd)["stages"].items()}
    assert {"synth_aligned", "tokenizer", "filter", "prebuild", "pretrain_unfiltered", "export_unfiltered_base",
            "eval_unfiltered_base", "report"} <= set(jobs)
    wait_for_jobs(jobs.values(), timeout=1500)
    capsys.readouterr()
    assert status_main([str(p), "--workdir", str(wd), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert {r["state"] for r in st["stages"]} == {"complete"}, st
    assert "| unfiltered | base |" in (wd / "report" / "misalignment.md").read_text()
