"""Client targets: one server, several ip:port replicas, or a dns:/// name (round-robin)."""

from __future__ import annotations

import json

import pytest
from proxmo_client import BuildError
from proxmo_client.client import channel_target


def test_one_target_keeps_grpcs_default_policy() -> None:
    assert channel_target("localhost:50051") == ("localhost:50051", [])


def test_several_targets_and_dns_names_balance_round_robin() -> None:
    target, options = channel_target(["127.0.0.1:1", "127.0.0.1:2"])
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    config = json.loads(dict(options)["grpc.service_config"])
    assert config == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert dict(options)["grpc.default_authority"] == "127.0.0.1:1"
    assert channel_target(["[::1]:1", "[::1]:2"])[0] == "ipv6:[::1]:1,[::1]:2"
    target, options = channel_target("dns:///proxmo-headless:50051")
    assert target == "dns:///proxmo-headless:50051"
    assert "round_robin" in dict(options)["grpc.service_config"]


@pytest.mark.parametrize("bad", [[], ["proxmo:1", "proxmo:2"], ["127.0.0.1:1", "[::1]:2"],
                                 ["127.0.0.1"]])
def test_bad_target_lists_name_the_field(bad: list[str]) -> None:
    with pytest.raises(BuildError) as error:
        channel_target(bad)
    assert error.value.field == "target"
