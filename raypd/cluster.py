"""What the connected Ray cluster has, or can grow to.

An autoscaling cluster (cluster.yaml: head `CPU: 0`, workers `min_workers: 0`) has no CPUs or
GPUs right after `ray up`: sizing from `ray.cluster_resources()` there refuses every study and
never asks for a GPU. So trial concurrency, `use_gpu` and "can a trial fit at all" come from
the autoscaler's node types (their resources and max_workers) when the cluster autoscales,
and from the live nodes when it does not.

Where the node types are read, first found wins:
1. the cluster config the autoscaler (v2, KubeRay) keeps in the GCS;
2. the YAML the head's autoscaler was started with (`ray start --autoscaling-config`, as
   `ray up` does with ~/ray_bootstrap_config.yaml): the monitor process's command line on
   this machine, else ~/ray_bootstrap_config.yaml;
3. the alive nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict  # per node: CPU, GPU, ...
    max_nodes: int

    def holds(self, bundle: dict) -> int:
        """How many copies of `bundle` one node of this type holds."""
        counts = [math.floor(self.resources.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        return min(counts) if counts else 0

    def describe(self) -> str:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(self.resources.items()) if k in ("CPU", "GPU"))
        return f"{self.name} ({res or 'no CPU'}) x{self.max_nodes}"


@dataclass(frozen=True)
class Capacity:
    node_types: tuple[NodeType, ...]
    source: str  # where the node types were read, for the user

    def total(self, resource: str) -> float:
        return sum(t.resources.get(resource, 0) * t.max_nodes for t in self.node_types)

    def fits(self, bundle: dict) -> bool:
        return any(t.max_nodes > 0 and t.holds(bundle) >= 1 for t in self.node_types)

    def describe(self) -> str:
        return f"{self.source}: " + "; ".join(t.describe() for t in self.node_types)


def node_types_from_config(config: dict) -> tuple[NodeType, ...]:
    """Node types of a cluster launcher / autoscaler YAML: the head once, each worker type up
    to its max_workers (and the cluster's max_workers)."""
    cluster_max = int(config.get("max_workers", 2**31))
    head = config.get("head_node_type")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        count = 1 if name == head else min(int(spec.get("max_workers", cluster_max)), cluster_max)
        out.append(NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, count))
    return tuple(out)


def _from_gcs() -> tuple[NodeType, ...] | None:
    from ray._private.state import state  # private: Ray Train and Ray Data read it the same way

    try:
        config = state.get_cluster_config()
    except Exception:  # an older GCS without the key
        return None
    if config is None or not config.node_group_configs:
        return None
    return tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
                 for g in config.node_group_configs)


def _autoscaling_config_file(gcs_address: str) -> Path | None:
    """The --autoscaling-config of this cluster's autoscaler, when it runs on this machine."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args]
        # the v1 (autoscaler/_private) or v2 (autoscaler/v2, as `ray up` starts it) monitor
        if (any("autoscaler/" in a and a.endswith("/monitor.py") for a in args)
                and f"--gcs-address={gcs_address}" in args):
            for a in args:
                if a.startswith("--autoscaling-config="):
                    return Path(a.split("=", 1)[1]).expanduser()
    bootstrap = BOOTSTRAP_CONFIG.expanduser()
    return bootstrap if bootstrap.exists() else None


def _from_live_nodes() -> tuple[NodeType, ...]:
    import ray

    return tuple(NodeType(n["NodeManagerAddress"], dict(n["Resources"]), 1) for n in ray.nodes() if n["Alive"])


def cluster_capacity() -> Capacity:
    """What the connected cluster can grow to (ray.init must have run)."""
    import ray
    import yaml

    # A node type with no resources stated (the local provider's, or a cloud type left for
    # the launcher to fill in) says nothing: the nodes that are up say more.
    types = _from_gcs()
    if types and all(t.resources for t in types):
        return Capacity(types, "the autoscaler's node types (GCS)")
    path = _autoscaling_config_file(ray.get_runtime_context().gcs_address)
    if path is not None:
        try:
            types = node_types_from_config(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
            types = ()
        if types and all(t.resources for t in types):
            return Capacity(types, f"the autoscaler's node types ({path})")
    return Capacity(_from_live_nodes(), "the cluster's live nodes")


def cluster_cpus() -> float:
    """CPUs of the connected cluster, or what its autoscaler can grow it to."""
    import ray

    return cluster_capacity().total("CPU") or ray.cluster_resources().get("CPU", 1) or 1


def use_gpu(config, capacity: Capacity | None = None) -> bool:
    """Whether training uses GPUs: train.use_gpu of `config` (a raypd.config.Config), or (when
    unset) whether the cluster has GPUs or can grow them: an autoscaling cluster's GPU nodes
    start only when something asks for a GPU. capacity: default, the connected cluster's."""
    if config.train.use_gpu is not None:
        return config.train.use_gpu
    if capacity is None:
        capacity = cluster_capacity()
    return capacity.total("GPU") > 0
