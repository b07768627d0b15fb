"""The plan of a run: each stage's hash, which stages are complete and which must run."""

from __future__ import annotations

import json
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
