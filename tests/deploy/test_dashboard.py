"""The Grafana dashboard shows what the server really exports: every metric its PromQL queries
is in a live /metrics of a real server (after real traffic), and its per-task table reads fields
that the live REST /v1/tasks really returns. The provisioning references resolve."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import yaml
from proxmo_client import ProxmoClient

from .conftest import ROOT, LiveServer

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "proxmo.json"
# Counters with labels only get a sample once their event happens; they must still be declared
# (HELP/TYPE) by the server. A CPU server with encoder "auto" has no encoder fallback to count.
EVENT_ONLY = {"proxmo_encoder_fallbacks_total"}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _targets(datasource_type: str) -> list[dict[str, Any]]:
    return [t for p in _dashboard()["panels"] for t in p.get("targets", [])
            if t["datasource"]["type"] == datasource_type]


def _queried_metrics() -> set[str]:
    names = set()
    for target in _targets("prometheus"):
        names.update(re.findall(r"\b(proxmo_[a-z0-9_]+)\b", target["expr"]))
    return names


def _exported(text: str) -> tuple[set[str], set[str]]:
    """(series names with samples, names declared by # TYPE) of a Prometheus text page."""
    samples, declared = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return samples, declared


def _traffic(server: LiveServer) -> None:
    """One real request through gRPC (history on), a prefetch and an ENCODER request (cache
    hits), and one rejected request through REST."""
    batch = [
        {"trajectory_id": f"t{i}", "group_id": "g", "task_id": "dashboard-task",
         "states": ["You are in the hall.", f"You see door {i}."], "rewards": [0.0, float(i % 2)]}
        for i in range(4)
    ]
    with ProxmoClient(server.grpc_target) as client:
        client.compute_advantages(batch, preset="proxmo", success_rate_source="history")
        states = [s for t in batch for s in t["states"]]
        client.prefetch_states(states, wait=True)
        client.compute_advantages(batch, preset="proxmo", similarity="encoder", dry_run=True)
    bad = httpx.post(f"{server.http_url}/v1/advantages", json={"trajectories": []})
    assert bad.status_code == 422


def test_every_dashboard_metric_is_exported(live_server: LiveServer) -> None:
    _traffic(live_server)
    samples, declared = _exported(httpx.get(f"{live_server.http_url}/metrics").text)
    queried = _queried_metrics()
    assert len(queried) >= 10
    missing = {m for m in queried - EVENT_ONLY if m not in samples}
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
    assert EVENT_ONLY & queried <= declared


def test_dashboard_covers_the_issue() -> None:
    """Request rate, latency percentiles, rows/s, fallback and replay counts, encoder backend,
    per-task success rates."""
    exprs = " ".join(t["expr"] for t in _targets("prometheus"))
    for needed in ("rate(proxmo_requests_total", "histogram_quantile(0.99",
                   "proxmo_rows_processed_total", "proxmo_store_fallbacks_total",
                   "proxmo_store_replays_total", "proxmo_encoder_backend_info"):
        assert needed in exprs, needed
    assert _targets("yesoreyeram-infinity-datasource")


def test_success_rate_table_reads_real_fields(live_server: LiveServer) -> None:
    _traffic(live_server)
    (target,) = _targets("yesoreyeram-infinity-datasource")
    params = {p["key"]: p["value"] for p in target["url_options"]["params"]}
    response = httpx.get(f"{live_server.http_url}{target['url']}", params=params)
    assert response.status_code == 200
    rows = response.json()[target["root_selector"]]
    task = next(r for r in rows if r["taskId"] == "dashboard-task")
    for column in target["columns"]:
        assert column["selector"] in task, column
    assert 0.0 <= task["successRate"] <= 1.0


def test_provisioning_resolves() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/datasources.yml").read_text())["datasources"]
    by_uid = {d["uid"]: d for d in datasources}
    for panel in _dashboard()["panels"]:
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref["uid"] in by_uid and by_uid[ref["uid"]]["type"] == ref["type"]
    assert by_uid["proxmo-prometheus"]["url"] == "http://prometheus:9090"
    assert by_uid["proxmo-rest"]["url"] == "http://proxmo:8000"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))
