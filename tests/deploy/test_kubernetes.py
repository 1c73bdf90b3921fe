"""deploy/kubernetes, checked without a cluster: every manifest passes the Kubernetes OpenAPI
schemas (PyPI kubernetes-validate, strict: unknown fields fail), and the manifests agree with
each other and with the server's real settings (ports, probes, drain time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from proxmo.server.config import ENV_PREFIX, Settings, load_settings

from .conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # an older supported minor and the newest schema


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        from .conftest import tool

        tool("kubernetes-validate")
    return kubernetes_validate


def _resources() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def _kind(kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for _, d in _resources()
                if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_the_schema(version: str) -> None:
    kv = _validator()
    resources = _resources()
    assert {d["kind"] for _, d in resources} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
        "StatefulSet"}
    for _filename, doc in resources:
        kv.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_schema_validation_can_fail() -> None:
    kv = _validator()
    deployment = _kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.37.0", strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def _settings() -> Settings:
    data = _kind("ConfigMap", "proxmo-config")["data"]
    unknown = set(data) - {ENV_PREFIX + n.upper() for n in Settings.__dataclass_fields__}
    assert not unknown, f"not server settings: {unknown}"
    return load_settings([], data)


def test_deployment_matches_the_server() -> None:
    settings = _settings()
    deployment = _kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "http": settings.http_port}
    assert container["envFrom"][0]["configMapRef"]["name"] == "proxmo-config"
    assert container["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Graceful termination covers the preStop pause plus the server's drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + settings.grace_period_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's numeric USER
    assert settings.redis_url.startswith("redis://proxmo-redis:")
    assert any(m["mountPath"] == "/var/cache/proxmo" for m in container["volumeMounts"])
    assert settings.encoder_engine_cache_dir.startswith("/var/cache/proxmo/")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_selectors_and_targets_agree() -> None:
    deployment = _kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("proxmo", "proxmo-headless"):
        service = _kind("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        container_ports = {p["name"] for p in
                           deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() \
        <= labels.items()
    hpa = _kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] >= 2 > _kind("PodDisruptionBudget")["spec"]["minAvailable"]


def test_grpc_is_balanced_per_call_through_the_headless_service() -> None:
    """Trainers resolve the headless Service (one address per ready pod) and balance calls
    round-robin; REST keeps the ClusterIP Service."""
    from proxmo_client.client import channel_target

    headless = _kind("Service", "proxmo-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert [p["name"] for p in headless["ports"]] == ["grpc"]
    rest = _kind("Service", "proxmo")["spec"]
    assert rest.get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in rest
    assert "http" in {p["name"] for p in rest["ports"]}
    port = next(p["port"] for p in headless["ports"])
    target, options = channel_target(f"dns:///proxmo-headless:{port}")
    assert target == "dns:///proxmo-headless:50051"
    assert "round_robin" in dict(options)["grpc.service_config"]


def test_redis_statefulset_is_durable() -> None:
    statefulset = _kind("StatefulSet", "proxmo-redis")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data"
               for m in container["volumeMounts"])
    service = _kind("Service", "proxmo-redis")
    assert statefulset["spec"]["serviceName"] == "proxmo-redis"
    settings = _settings()
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    assert [p["port"] for p in service["spec"]["ports"]] == [port]


def test_manifest_files_are_plain_yaml() -> None:
    """Every file under deploy/kubernetes parses (no templating left for a tool to fill)."""
    for path in K8S.glob("*.yaml"):
        assert list(yaml.safe_load_all(Path(path).read_text())), path
