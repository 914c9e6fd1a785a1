"""The deployment files against the contract and against running servers (no container engine, no cluster).

- The Kubernetes manifests (the resources ``deploy/kubernetes/kustomization.yaml``
  lists) keep the contract's rules: replicas, probes, resources and workers,
  the grace period, the security context, secrets only through
  ``secretKeyRef``, the Services, budgets and network policies.
- ``authsvc grpc`` and ``authsvc webhook`` run as the image and the manifests
  say (the Dockerfile's ``ENTRYPOINT`` and ``ENV``, the container's ``args``,
  ``env`` and ``envFrom``), on loopback ports mapped from the manifests' ports,
  over a private database; every probe the manifests write is executed the way
  the kubelet does, then again with the database stopped (readiness fails,
  liveness never does).
- Every metric name the alert rules and the Grafana dashboard use is on one
  of the two servers' ``/metrics``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import multiprocessing
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from authsvc.dev.procs import ServerProcess, child_env, free_port, health_check
from service.embedded import EmbeddedMongo
from tests.conftest import WEBHOOK_SECRET
from tests.fakeclerk import SECRET as CLERK_SECRET
from tests.fakeclerk import serve_in_child

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/kubernetes"
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"
DASHBOARD = ROOT / "deploy/grafana/authsvc.json"
SECRETS = {"MONGODB_URI", "CLERK_WEBHOOK_SECRET", "CLERK_SECRET_KEY"}
PROMETHEUS_OWN = {"up"}

Doc = dict[str, Any]


# --- the manifests, as kustomize reads them -----------------------------------------------------
@functools.cache
def manifests() -> list[Doc]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for name in kustomization["resources"]:
        docs += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return docs


def config_map() -> dict[str, str]:
    """The ``authsvc-config`` ConfigMap's data (kustomization's ``configMapGenerator`` env file)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    data: dict[str, str] = {}
    for name in generator["envs"]:
        for line in (K8S / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key] = value
    return data


def of_kind(kind: str) -> list[Doc]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def deployment(component: str) -> Doc:
    (found,) = [d for d in of_kind("Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return found


def container(component: str) -> Doc:
    containers: list[Doc] = deployment(component)["spec"]["template"]["spec"]["containers"]
    (found,) = containers
    return found


def literal_env(component: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(component)["env"] if "value" in e}


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def port_number(component: str, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container(component)["ports"] if p["name"] == port]
    return int(number)


COMPONENTS = ("grpc", "webhook")


# --- the contract's rules ---------------------------------------------------------------------
@pytest.mark.parametrize("component", COMPONENTS)
def test_each_deployment_keeps_the_contract(component: str) -> None:
    spec = deployment(component)["spec"]
    pod = spec["template"]["spec"]
    c = container(component)
    env = literal_env(component)
    assert spec["replicas"] >= 2
    assert env["AUTHSVC_ENV"] == "production"
    addr = env["AUTHSVC_GRPC_ADDR" if component == "grpc" else "AUTHSVC_WEBHOOK_ADDR"]
    assert addr.startswith("0.0.0.0:")

    readiness, liveness = c["readinessProbe"], c["livenessProbe"]
    if component == "grpc":
        assert readiness["grpc"]["port"] == int(addr.rpartition(":")[2])
        assert "tcpSocket" in liveness or liveness.get("httpGet", {}).get("path") == "/metrics"
    else:
        assert readiness["httpGet"]["path"] == "/readyz"
        assert liveness["httpGet"]["path"] == "/healthz"

    resources = c["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    workers = env["AUTHSVC_WORKERS"]
    if workers == "auto":
        assert "cpu" in resources["limits"], "auto workers read the CPU limit"
    else:
        assert int(workers) <= cpus(resources["requests"]["cpu"])

    (pre_stop,) = c["lifecycle"]["preStop"]["exec"]["command"][1:]
    drain = float(env.get("AUTHSVC_DRAIN_S", "2"))
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop) + drain + 5 + 5

    security = c["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == env["TMPDIR"]
    assert any(v["name"] == mount["name"] and "emptyDir" in v for v in pod["volumes"])
    assert {t["topologyKey"] for t in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}

    for entry in c["env"]:
        if entry["name"] in SECRETS:
            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry["name"]
    assert not SECRETS & set(config_map())


def test_services_budgets_and_network_policies() -> None:
    grpc_selector = deployment("grpc")["spec"]["selector"]["matchLabels"]
    services = [s for s in of_kind("Service") if s["spec"]["selector"] == grpc_selector]
    assert sorted(s["spec"].get("clusterIP", "auto") for s in services) == ["None", "auto"]  # headless + ClusterIP
    for component in COMPONENTS:
        selector = deployment(component)["spec"]["selector"]
        assert any(p["spec"]["selector"] == selector for p in of_kind("PodDisruptionBudget")), component

    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind("NetworkPolicy")}
    webhook = policies["authsvc-webhook"]
    assert webhook["podSelector"]["matchLabels"] == deployment("webhook")["spec"]["selector"]["matchLabels"]
    (rule,) = webhook["ingress"]
    assert "from" not in rule and [p["port"] for p in rule["ports"]] == [8080]  # anyone, that port only
    grpc_policy = policies["authsvc-grpc"]
    assert grpc_policy["podSelector"]["matchLabels"] == grpc_selector
    by_port = {r["ports"][0]["port"]: r["from"] for r in grpc_policy["ingress"]}
    assert by_port[50051] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"authsvc.io/client": "true"}}}]
    assert by_port[9464] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


# --- metric names in the rules and the dashboard ----------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or numbers)."""
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub('""', expr))))
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == "." or text[match.end() :].lstrip().startswith("("):
            continue
        if match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = 'sum by (job, le) (rate(grpc_server_handling_seconds_bucket{grpc_method=~"A|B"}[5m])) > bool 0.25'
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket"}
    assert metric_names("a:b == 1 and c_total offset 5m / on (x) group_left (y) d") == {"a:b", "c_total", "d"}


def used_metric_names() -> tuple[set[str], set[str]]:
    """The metric names the alert rules and the dashboard select; and the names the rules record."""
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    used = set().union(*(metric_names(rule["expr"]) for rule in rules))
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= metric_names(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= set(re.findall(r"label_values\((\w+)", variable["definition"]))
    return used, recorded


def exposed_names(text: str) -> set[str]:
    """Every series name a ``/metrics`` page exports or declares (a declared family without samples counts)."""
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


# --- running the image's commands as the manifests configure them ------------------------------
def image_config() -> tuple[list[str], dict[str, str]]:
    """The Dockerfile's final ``ENTRYPOINT`` (exec form) and the ``ENV`` of its last stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM\s", text, flags=re.MULTILINE)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("ENV "):
            env.update(part.split("=", 1) for part in shlex.split(line[4:]))  # type: ignore[misc]
    (entrypoint,) = re.findall(r"^ENTRYPOINT\s+(\[.*\])$", stages[-1], flags=re.MULTILINE)
    return json.loads(entrypoint), env


@dataclass
class Running:
    ports: dict[int, int]  # manifest port -> loopback port
    processes: dict[str, ServerProcess]
    mongo: EmbeddedMongo

    def local(self, component: str, port: int | str) -> int:
        return self.ports[port_number(component, port)]


def process_env(component: str, ports: dict[int, int], secrets: dict[str, str], tmp: Path) -> dict[str, str]:
    """The container's environment (image ENV, envFrom, env) with secrets filled in and binds on loopback."""
    _, env = image_config()
    env = {**env, **config_map()}
    for entry in container(component)["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif entry["name"] in secrets:
            env[entry["name"]] = secrets[entry["name"]]
        else:
            assert entry["valueFrom"]["secretKeyRef"].get("optional"), entry["name"]
    for name, value in env.items():
        bind = re.fullmatch(r"0\.0\.0\.0:(\d+)", value)
        if bind:
            env[name] = f"127.0.0.1:{ports.setdefault(int(bind[1]), free_port())}"
    env["TMPDIR"] = str(tmp)
    # One process: /metrics then declares every family, also those without samples yet (with
    # workers, multiprocess mode shows a family only once a worker has written to it).
    env["AUTHSVC_WORKERS"] = "1"
    env["AUTHSVC_DRAIN_S"] = "0.2"  # the drain is tested elsewhere; here it would only slow the teardown
    # Serving from the user cache through an outage is tested elsewhere: here readiness follows the database
    # at once, whether or not the change stream has confirmed the cache yet.
    env["AUTHSVC_STALE_S"] = "0"
    # A key instead of the JWKS of the (placeholder) Clerk instance: no network.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    env["CLERK_JWT_KEY"] = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return env


async def probe_ok(running: Running, component: str, probe: Doc) -> bool:
    """One probe, as the kubelet runs it (its timeout included)."""
    timeout = probe.get("timeoutSeconds", 1)
    try:
        async with asyncio.timeout(timeout):
            if "grpc" in probe:
                target = f"127.0.0.1:{running.local(component, probe['grpc']['port'])}"
                async with grpc.aio.insecure_channel(target) as channel:
                    request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
                    reply = await health_check(channel)(request)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = f"http://127.0.0.1:{running.local(component, get['port'])}{get['path']}"
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    return 200 <= response.status < 400
            port = running.local(component, probe["tcpSocket"]["port"])
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return True
    except (TimeoutError, OSError, aiohttp.ClientError, grpc.aio.AioRpcError):
        return False


async def until_probe(running: Running, component: str, kind: str, expected: bool, within_s: float) -> None:
    probe = container(component)[kind]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while await probe_ok(running, component, probe) != expected:
        log = running.processes[component].tail()
        assert loop.time() < deadline, f"{component} {kind} still {not expected}:\n{log}"
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("deployed")
    mongo = EmbeddedMongo(tmp / "mongo")
    asyncio.run(mongo.start())
    entrypoint, _ = image_config()
    executable = str(Path(sys.executable).with_name(entrypoint[0]))
    state = Running(ports={}, processes={}, mongo=mongo)
    # A fake Clerk Backend API in a process of its own, so that the sidecar completes a periodic
    # repair (and exports authsvc_sync_last_success_timestamp_seconds, which an alert uses).
    spawn = multiprocessing.get_context("spawn")
    clerk_port, clerk_stop = spawn.Queue(), spawn.Queue()
    clerk = spawn.Process(target=serve_in_child, args=(clerk_port, clerk_stop))
    clerk.start()
    clerk_api = {"CLERK_API_URL": f"http://127.0.0.1:{clerk_port.get(timeout=60)}", "AUTHSVC_SYNC_INTERVAL_S": "3600"}
    secrets = {"MONGODB_URI": mongo.uri, "CLERK_WEBHOOK_SECRET": WEBHOOK_SECRET, "CLERK_SECRET_KEY": CLERK_SECRET}
    try:
        for component in COMPONENTS:
            env = process_env(component, state.ports, secrets, tmp)
            if component == "webhook":
                env.update(clerk_api)
            process = ServerProcess(
                component,
                [executable, *entrypoint[1:], *container(component)["args"]],
                env=child_env(**env),
                logfile=tmp / f"{component}.log",
                cwd=tmp,
            )
            process.start()
            state.processes[component] = process
        for component in COMPONENTS:
            asyncio.run(until_probe(state, component, "readinessProbe", True, within_s=60))
        yield state
    finally:
        with concurrent.futures.ThreadPoolExecutor() as pool:  # both drain at once
            list(pool.map(ServerProcess.stop, state.processes.values()))
        clerk_stop.put("stop")
        clerk.join(10)
        mongo.stop()


async def test_every_metric_the_rules_and_dashboard_use_is_exposed(running: Running) -> None:
    used, recorded = used_metric_names()
    assert {"authsvc_denials_total", "grpc_server_handling_seconds_bucket", "authsvc_webhook_deliveries_total"} <= used
    deadline = asyncio.get_running_loop().time() + 30  # a gauge appears once it has a value (the sync's: one run)
    while True:
        exposed: set[str] = set()
        async with aiohttp.ClientSession() as session:
            for url in (
                f"http://127.0.0.1:{running.ports[9464]}/metrics",  # AUTHSVC_METRICS_ADDR of authsvc grpc
                f"http://127.0.0.1:{running.ports[8080]}/metrics",  # the sidecar's own address
            ):
                async with session.get(url) as response:
                    assert response.status == 200
                    exposed |= exposed_names(await response.text())
        missing = {name for name in used if ":" not in name} - exposed - PROMETHEUS_OWN
        if not missing or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert not missing, f"not on any /metrics: {sorted(missing)}"
    assert {name for name in used if ":" in name} <= recorded


async def test_the_probes_as_written_pass_against_the_running_servers(running: Running) -> None:
    for component in COMPONENTS:
        for kind in ("readinessProbe", "livenessProbe"):
            assert await probe_ok(running, component, container(component)[kind]), (component, kind)


async def test_with_the_database_down_readiness_fails_and_liveness_never_does(running: Running) -> None:
    running.mongo.stop()
    for component in COMPONENTS:
        await until_probe(running, component, "readinessProbe", False, within_s=15)
    for _ in range(3):
        for component in COMPONENTS:
            assert await probe_ok(running, component, container(component)["livenessProbe"]), component
        await asyncio.sleep(0.3)
