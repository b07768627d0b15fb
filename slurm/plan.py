"""The plan of a run: each stage's hash, which stages are complete and which must run."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_align.config import atomic_write_text

from . import stamps
from .graph import JobGraph


@dataclass
class Plan:
    graph: JobGraph
    workdir: Path
    hashes: dict[str, str]
    complete: list[str]
    todo: list[str]
    edges: dict[str, list[str]] = field(default_factory=dict)


def make_plan(graph: JobGraph, workdir: Path, force: list[str] | None = None) -> Plan:
    workdir = Path(workdir).resolve()
    info = stamps.plan_hashes(graph, workdir)
    forced = set()
    for f in force or []:
        graph[f]
        forced |= {f, *graph.dependents(f)}
    # Complete means: stamp current, outputs present, and everything upstream complete too (an
    # upstream stage that must run again would rewrite this stage's inputs).
    edges = graph.edges()
    complete: list[str] = []
    for n in graph.topo_order():
        if n not in forced and all(d in complete for d in edges[n]) and stamps.is_complete(graph, workdir, n, info):
            complete.append(n)
    todo = [n for n in graph.topo_order() if n not in complete]
    return Plan(graph=graph, workdir=workdir, hashes={n: v["hash"] for n, v in info.items()},
                complete=complete, todo=todo, edges=edges)


def write_plan_file(plan: Plan, path: Path) -> None:
    atomic_write_text(path, json.dumps({"graph": plan.graph.to_dict(), "workdir": str(plan.workdir),
                                        "hashes": plan.hashes}, indent=1))


def retire_stale_outputs(plan: Plan, out=print) -> list[str]:
    """Before the stages of ``plan.todo`` are launched: a resumable (``requeue``) stage resumes from
    its outputs only when they come from an unfinished run of the same stage. Outputs of a run
    that finished (the stage is forced, changed, or its upstream runs again) or that started with
    another hash are moved aside, so a training stage trains afresh instead of resuming a stale
    checkpoint; nothing is deleted. Then every todo stage's launch hash is recorded. Returns the
    paths moved aside."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in plan.todo:
        stage = plan.graph[name]
        want = plan.hashes[name]
        if stage.requeue:
            started = stamps.read_start(plan.workdir, name)
            finished = stamps.read_stamp(plan.workdir, name)
            if finished is not None or (started is not None and started.get("hash") != want):
                for o in stage.outputs:
                    p = stamps.resolve(plan.workdir, o)
                    if p.exists():
                        aside, k = p.with_name(f"{p.name}.replaced-{stamp}"), 2
                        while aside.exists():
                            aside, k = p.with_name(f"{p.name}.replaced-{stamp}-{k}"), k + 1
                        os.rename(p, aside)
                        moved.append(str(aside))
                        out(f"{name}: its earlier run is not resumed (" + ("it finished" if finished is not None
                            else "started with other settings") + f"); moved aside to {aside}")
                stamps.clear_stamp(plan.workdir, name)  # it described the run just moved aside
        stamps.write_start(plan.workdir, name, want)
    return moved
