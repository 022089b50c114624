"""One client, several replicas: with the default round_robin policy, a target that
resolves to two generation servers has both serve the client's calls (as a headless
Service's DNS name resolves to every pod)."""

from __future__ import annotations

from atelier.client import GenerationClient
from tests.generation.conftest import start_generation
from tests.kit.test_server import sample, scrape


def handled(server, method: str) -> float:
    return sample(scrape(server.server.metrics_port), "grpc_server_handled_total",
                  grpc_type="unary", grpc_service="atelier.v1.GenerationService",
                  grpc_method=method, grpc_code="OK") or 0


def test_calls_spread_over_every_address_of_the_target(tmp_path, model_cache):
    servers = [start_generation(tmp_path / f"replica{i}", model_cache) for i in range(2)]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{s.server.port}" for s in servers)
        with GenerationClient(target) as client:
            for _ in range(12):
                list(client.list_models())
        spread = [handled(s, "ListModels") for s in servers]
        assert sum(spread) == 12
        assert min(spread) > 0, spread  # both replicas served this one client
        with GenerationClient(target, load_balancing="pick_first") as pinned:
            for _ in range(6):
                list(pinned.list_models())
        added = sorted(handled(s, "ListModels") - n for s, n in zip(servers, spread,
                                                                     strict=True))
        assert added == [0, 6]  # the control: one connection, one replica
    finally:
        for server in servers:
            server.stop()
