"""Cluster profile: where and how a study's jobs run on a Slurm cluster.

A profile is a small YAML file kept next to the study (``--cluster CLUSTER.yaml``)::

    account: proj123
    partition: batch
    qos: normal
    python: /opt/venv/bin/python        # the interpreter inside the job (container or not)
    container: {image: nvcr.io#nvidia/pytorch:25.01-py3, mounts: [/lustre:/lustre]}
    env: {NCCL_DEBUG: WARN}            # constants exported in every job; never secrets
    env_passthrough: [WANDB_API_KEY]    # names passed from the submitting environment, values never written
    resources:
      gpu-train: {nodes: 64, gpus_per_node: 8, cpus_per_task: 96, mem: 0, time: "48:00:00"}

Every value here ends up in a shell script, so everything that is not plainly safe is either
rejected here or shell-quoted by the renderer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_align.config import ConfigError, deep_merge, from_dict, load_yaml, parse_overrides

from .graph import SECRET_NAME

# Values that sit on #SBATCH lines unquoted must be made of these characters.
_SAFE = re.compile(r"^[A-Za-z0-9_.,:@%+=/-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.I)


@dataclass
class ResourceClass:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem: str | None = "16G"
    time: str = "04:00:00"
    partition: str | None = None
    qos: str | None = None
    exclusive: bool = False
    # Further #SBATCH options for this class, e.g. ["--constraint=h100"]; checked like other values.
    sbatch: list[str] = field(default_factory=list)


@dataclass
class Container:
    image: str
    mounts: list[str] = field(default_factory=list)
    workdir: str | None = None


DEFAULT_RESOURCES: dict[str, dict] = {
    "cpu": {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 8, "mem": "32G", "time": "04:00:00"},
    "gpu-train": {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 64, "mem": "0", "time": "24:00:00",
                  "exclusive": True},
    "gpu-eval": {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 8, "mem": "64G", "time": "04:00:00"},
}


@dataclass
class ClusterProfile:
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    python: str = "python"
    container: Container | None = None
    env: dict[str, str] = field(default_factory=dict)
    env_passthrough: list[str] = field(default_factory=list)
    # Shell lines run at the top of every job (module load ..., source a venv). Written as given:
    # they come from the user's own profile, like a line they would type in their sbatch script.
    setup: list[str] = field(default_factory=list)
    resources: dict[str, ResourceClass] = field(default_factory=dict)
    master_port: int = 29500
    signal_seconds: int = 120
    max_requeues: int = 50
    template_dir: str | None = None
    log_dir: str | None = None

    def validate(self) -> None:
        for key in ("account", "partition", "qos"):
            v = getattr(self, key)
            if v is not None and not _SAFE.match(v):
                raise ConfigError(f"{key}: {v!r} has characters Slurm names never contain")
        for name, rc in self.resources.items():
            where = f"resources.{name}"
            if not _TIME.match(rc.time):
                raise ConfigError(f"{where}.time: {rc.time!r} is not a Slurm time (e.g. 04:00:00, 2-00:00:00)")
            if rc.mem is not None and not _MEM.match(str(rc.mem)):
                raise ConfigError(f"{where}.mem: {rc.mem!r} is not a Slurm memory size (e.g. 64G, 0 = all)")
            for k in ("partition", "qos"):
                v = getattr(rc, k)
                if v is not None and not _SAFE.match(v):
                    raise ConfigError(f"{where}.{k}: {v!r} has characters Slurm names never contain")
            for opt in rc.sbatch:
                if not re.match(r"^--[a-z][a-z-]*(=[A-Za-z0-9_.,:@%+=/&|!*-]+)?$", opt):
                    raise ConfigError(f"{where}.sbatch: {opt!r} must look like --option or --option=value "
                                      "with no spaces or quotes")
            if rc.nodes < 1 or rc.gpus_per_node < 0 or rc.cpus_per_task < 1:
                raise ConfigError(f"{where}: nodes and cpus_per_task must be >= 1, gpus_per_node >= 0")
        for k, v in self.env.items():
            if not _ENV_NAME.match(k):
                raise ConfigError(f"env.{k}: not a valid environment variable name")
            if SECRET_NAME.search(k):
                raise ConfigError(f"env.{k}: looks like a secret; job scripts never contain secrets. List "
                                  f"it under env_passthrough and export it in the shell you submit from")
        for k in self.env_passthrough:
            if not _ENV_NAME.match(k):
                raise ConfigError(f"env_passthrough: {k!r} is not a valid environment variable name")
        if self.container is not None:
            for m in self.container.mounts:
                if "," in m or "\n" in m:
                    raise ConfigError(f"container.mounts: {m!r} must be one SRC:DST[:FLAGS] without commas")
        if self.signal_seconds < 1:
            raise ConfigError("signal_seconds must be >= 1")

    def resource(self, name: str) -> ResourceClass:
        if name not in self.resources:
            raise ConfigError(f"resources: no class {name!r} in the cluster profile (classes: "
                              f"{', '.join(self.resources)}); add it under 'resources:'")
        return self.resources[name]


def load_cluster(path=None, overrides: list[str] | None = None, data: dict | None = None) -> ClusterProfile:
    """Profile from YAML (or a mapping), with the default resource classes under the user's."""
    raw = dict(data or {})
    source = None
    if path is not None:
        raw = deep_merge(raw, load_yaml(path))
        source = str(path)
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    raw["resources"] = deep_merge(DEFAULT_RESOURCES, raw.get("resources") or {})
    prof = from_dict(ClusterProfile, raw, source=source)
    try:
        prof.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    return prof
