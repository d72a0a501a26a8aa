"""Every node of the cluster is asked whether it sees the workdir (orchestration/shared_workdir.py), with
real Ray tasks pinned to each alive node of the test cluster."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestration.shared_workdir import check_workdir_shared, nodes_not_seeing


@pytest.fixture
def ray_driver(ray_address: str) -> Iterator[str]:
    import ray

    from orchestration.cluster import start_ray

    started = start_ray(ray_address)
    yield ray_address
    if started:
        ray.shutdown()


def test_each_node_reads_the_marker_back_and_a_node_that_cannot_is_named(ray_driver: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("token-1")
    assert nodes_not_seeing(marker, "token-1") == []
    blind = nodes_not_seeing(tmp_path / "nowhere", "token-1")  # what a node without the filesystem sees
    assert len(blind) >= 1 and all(name.startswith(f"{socket.gethostname()} (") for name in blind)


def test_a_cluster_of_only_this_machine_is_not_asked(ray_driver: str, tmp_path: Path) -> None:
    check_workdir_shared(tmp_path / "workdir")  # one node, the driver's own: the same filesystem
    assert not (tmp_path / "workdir").exists()
