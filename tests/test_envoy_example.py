"""The shipped Envoy configuration parses as Envoy's own Bootstrap message and says what docs/api.md says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from authsvc_client.client import KEY_METADATA
from service.roles import Role

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/envoy/envoy.yaml"
# Registered in the default pool so that the config's typed_config Any fields resolve.
TYPES = (ext_authz_pb2, router_pb2, http_protocol_options_pb2)


def test_the_example_is_a_valid_envoy_bootstrap() -> None:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    bootstrap = json_format.ParseDict(raw, bootstrap_pb2.Bootstrap())  # unknown fields or types raise
    (listener,) = bootstrap.static_resources.listeners
    manager = http_connection_manager_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)

    ext_authz = ext_authz_pb2.ExtAuthz()
    assert manager.http_filters[0].typed_config.Unpack(ext_authz)
    assert ext_authz.failure_mode_allow is False
    assert ext_authz.grpc_service.envoy_grpc.cluster_name == "authsvc"
    # A caller of authsvc like any other: its key on every Check (see AUTHSVC_CALLERS_FILE).
    assert [(m.key, bool(m.value)) for m in ext_authz.grpc_service.initial_metadata] == [(KEY_METADATA, True)]
    assert "authsvc" in {cluster.name for cluster in bootstrap.static_resources.clusters}

    min_roles = []
    for route in manager.route_config.virtual_hosts[0].routes:
        per_route = ext_authz_pb2.ExtAuthzPerRoute()
        assert route.typed_per_filter_config["envoy.filters.http.ext_authz"].Unpack(per_route)
        if not per_route.disabled:
            min_roles.append(per_route.check_settings.context_extensions["min_role"])
    assert [Role.parse(name) for name in min_roles] == [Role.SUPERADMIN, Role.ADMIN, Role.STAFF]
