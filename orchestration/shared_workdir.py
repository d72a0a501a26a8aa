"""Is the workdir on a filesystem every node of the Ray cluster shares? (README, "Joining a Ray cluster")

    check_workdir_shared(Path(config.workdir))   # WorkdirNotShared names the nodes that cannot see it

Stages hand each other folders by path: the tokenizer a task wrote on one node is read by tokenize
tasks on others, and the training ranks store their checkpoints in one folder. On a node that does
not see the workdir they fail late and obscurely (a tokenizer "not trained", a checkpoint storage
error after the first checkpoint). So before any stage, every alive node reads back a marker the
driver wrote there: one zero-CPU task per node, which runs even where every CPU is taken. Nodes that
join later are not checked.
"""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 120.0  # a node starts a worker process for the probe: seconds, more on a busy node


class WorkdirNotShared(ValueError):
    """A node of the cluster does not see the run's workdir."""


def _read_marker(path: str) -> tuple[str, str | None]:
    """On one node: its host name, and the marker's text as this node sees it (None: no such file)."""
    marker = Path(path)
    return socket.gethostname(), marker.read_text() if marker.is_file() else None


def nodes_not_seeing(path: Path, expected: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """The alive nodes ("host (ip)") on which `path` does not hold `expected`; each node is asked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    pending = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(str(path))
        for node in nodes
    ]
    answers = ray.get(pending, timeout=timeout_s)
    return [
        f"{host} ({node['NodeManagerAddress']})"
        for node, (host, text) in zip(nodes, answers, strict=True)
        if text != expected
    ]


def check_workdir_shared(workdir: Path) -> None:
    """Every alive node sees a marker written in `workdir` now; a cluster of only this machine is not asked."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id():
        return  # the private local cluster, or a one-node cluster on this machine
    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / f".shared-check-{uuid.uuid4().hex}"
    marker.write_text(marker.name)
    try:
        blind = nodes_not_seeing(marker, marker.name)
    except ray.exceptions.GetTimeoutError:
        log.warning("could not check within %.0f s that every node sees workdir %s", PROBE_TIMEOUT_S, workdir)
        return
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise WorkdirNotShared(
            f"workdir {workdir} is not visible from node(s) {', '.join(blind)} of the Ray cluster: stages on "
            "different nodes hand each other folders there, so it must be on a filesystem every node mounts at "
            "the same path (NFS, a cluster filesystem); set workdir to such a path"
        )
