"""Monitoring (``monitoring/``): the Prometheus config and alerting rules through Debian's ``promtool`` (its checks and
the rules' unit tests), and a real Prometheus scraping the session's cluster while the app answers.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package, which ``make test`` installs when missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from conftest import REPO, App, bearer
from shoprank.entrypoint import free_port
from shoprank.serving.app import APP_NAME
from shoprank.serving.metrics import HeldGauges, endpoint_of
from shoprank.store.tables import read_table

MONITORING = REPO / "monitoring"
CONFIG, RULES, RULES_TEST = (MONITORING / name for name in
                             ("prometheus.yml", "shoprank_rules.yml", "shoprank_rules_test.yml"))
DASHBOARD = MONITORING / "grafana_dashboard.json"
METRICS_SOURCE = REPO / "platform" / "shoprank" / "serving" / "metrics.py"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: `make test` installs Debian's prometheus package, which brings it")
    return found


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)


def alert_names() -> list[str]:
    return [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_config_and_the_rules() -> None:
    for checked in (promtool("check", "config", CONFIG), promtool("check", "rules", RULES)):
        assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 20 rules found" in promtool("check", "rules", RULES).stdout  # 12 recorded, 8 alerts
    assert len(alert_names()) == 8


def test_each_alert_fires_and_stays_quiet_in_the_rules_unit_tests() -> None:
    tested = promtool("test", "rules", RULES_TEST)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = [case for test in yaml.safe_load(RULES_TEST.read_text())["tests"] for case in test.get("alert_rule_test", ())]
    for alert in alert_names():
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == alert]
        assert any(expected), f"no unit test sees {alert} fire"
        assert any(not alerts for alerts in expected), f"no unit test sees {alert} stay quiet"


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: with the 5xx alert's threshold raised over the failing share, they do."""
    shutil.copy(RULES_TEST, tmp_path)
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(") > 0.05", ") > 0.5"))
    tested = promtool("test", "rules", tmp_path / RULES_TEST.name)
    assert tested.returncode != 0
    assert "ShoprankHigh5xxRate" in tested.stdout + tested.stderr


def defined_metrics() -> set[str]:
    """The metric names the app defines (``ray.serve.metrics`` constructors in its metrics module), as Prometheus
    names them: Ray's ``ray_`` prefix, ``_total`` for a counter."""
    source = METRICS_SOURCE.read_text()
    return {f"ray_{name}{'_total' if kind == 'Counter' else ''}"
            for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(shoprank_\w+)\"", source)}


def test_rules_dashboard_and_docs_name_only_metrics_the_app_defines() -> None:
    defined = defined_metrics()
    assert len(defined) == 17
    table = set(re.findall(r"``(ray_shoprank_\w+)``", METRICS_SOURCE.read_text()))
    assert table == defined, "the metrics module's docstring table and its definitions differ"
    histograms = {name for name in defined if not name.endswith("_total")}
    for path in (RULES, DASHBOARD):
        used = set(re.findall(r"\bray_shoprank_\w+", path.read_text()))
        unknown = {name for name in used
                   if name not in defined and re.sub(r"_(bucket|sum|count)$", "", name) not in histograms}
        assert not unknown, f"{path.name} names metrics the app does not define: {unknown}"


def test_an_endpoint_label_is_a_route_template_never_a_raw_path() -> None:
    """A path parameter (a user id) never becomes a label value, nor does a path the app does not serve; a request
    refused before routing (413 by the body limit) is still labelled with its route."""
    api, labels = FastAPI(), []

    @api.get("/users/{user_id}")
    async def user(user_id: str) -> dict[str, str]:
        return {}

    @api.post("/events")
    async def events() -> dict[str, str]:
        return {}

    def refusing(app: ASGIApp) -> ASGIApp:
        async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and dict(scope["headers"]).get(b"x-too-large"):
                await JSONResponse({}, status_code=413)(scope, receive, send)
            else:
                await app(scope, receive, send)
        return refuse

    def labelled(app: ASGIApp) -> ASGIApp:
        async def label(scope: Scope, receive: Receive, send: Send) -> None:
            await app(scope, receive, send)
            if scope["type"] == "http":
                labels.append(endpoint_of(scope))
        return label

    api.add_middleware(refusing)
    api.add_middleware(labelled)
    with TestClient(api) as client:
        client.get("/users/shopper-1234")
        client.post("/events", headers={"x-too-large": "1"})
        client.get("/users")
        client.get("/wp-admin/install.php?step=1")
    assert labels == ["/users/{user_id}", "/events", "other", "other"]


class RecordedGauge:
    """Stands in for a Ray gauge (which would need a Ray worker): the values set, with their tags."""

    def __init__(self) -> None:
        self.sets: list[tuple[float, dict[str, str]]] = []

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.sets.append((value, tags))


def test_held_gauges_are_set_again_until_let_go() -> None:
    """Ray forgets a gauge value that was not set for two export intervals: a held one is set again and again."""
    gauge, held = RecordedGauge(), HeldGauges(every_s=0.05)
    held.hold(gauge, 1, {"variant": "B", "ranker_run": "run-1"})
    held.hold(gauge, 7, {"variant": "A"})
    time.sleep(0.5)
    held.let_go(gauge, {"variant": "B", "ranker_run": "run-1"})
    time.sleep(0.1)
    before = len(gauge.sets)
    time.sleep(0.5)
    later = gauge.sets[before:]
    assert gauge.sets.count((1, {"variant": "B", "ranker_run": "run-1"})) >= 3
    assert later and set(map(repr, later)) == {repr((7, {"variant": "A"}))}  # B's series let go: no longer set


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard, with Grafana's variables as a query over all of it would have them."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [annotation["expr"] for annotation in dashboard["annotations"]["list"]]
    return [q.replace("$__rate_interval", "1m").replace("$application", ".*") for q in queries]


class Prometheus:
    """Debian's Prometheus on a loopback port, its data in ``home``, scraping every second."""

    def __init__(self, home: Path, discovery_file: Path) -> None:
        config = yaml.safe_load(CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(discovery_file)]
        shutil.copy(RULES, home / RULES.name)
        (home / CONFIG.name).write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (home / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={home / CONFIG.name}", f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def get(self, path: str, **params: str) -> Any:
        answer = self.http.get(path, params=params).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=promql)["result"]

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited with {self.process.returncode}"
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready within {timeout_s} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.http.close()
        self.log.close()


def send_traffic(app: App) -> dict[str, int]:
    """Searches and recommendations forced to each variant, a purchase attributed to each, one request refused;
    the searches sent per variant."""
    sent = {}
    with httpx.Client(base_url=app.url, timeout=60.0, headers=bearer(app.keys["client"])) as client:
        for variant in ("A", "B"):
            answers = [client.post(path, json={**body, "variant": variant, "k": 5})
                       for path, body in [("/search", {"query": "kitchen knife", "user_id": "monitoring-shopper"})] * 3
                       + [("/recommend", {"user_id": "monitoring-shopper"})]]
            assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
            shown = answers[0].json()
            stored = client.post("/events", json=[{
                "user_id": "monitoring-shopper", "product_id": shown["items"][0]["product_id"],
                "event_type": "purchase", "request_id": shown["request_id"], "variant": variant}])
            assert stored.status_code == 200, stored.text
            sent[variant] = 3
        assert client.post("/search", json={"query": " "}).status_code == 422
    return sent


def test_prometheus_scrapes_the_apps_metrics_of_each_variant(app: App, tmp_path: Path) -> None:
    """A real Prometheus, given the config with the session cluster's service discovery file, sees the app's
    request counters of variants A and B (and the other metrics the app records), loads the alerting rules, and
    evaluates every query of the dashboard."""
    # the session's own file: the copy in Ray's temp dir is whichever local cluster of this machine wrote it last
    discovery = Path(ray._private.worker._global_node.get_session_dir_path()) / "prom_metrics_service_discovery.json"
    prometheus = Prometheus(tmp_path, discovery)
    try:
        prometheus.wait_ready()
        sent = send_traffic(app)
        application = f'application="{APP_NAME}"'
        wanted = {
            "searches": f'sum by (variant) (ray_shoprank_requests_total{{{application}, endpoint="/search", '
                        'status="2xx"})',
            "impressions": f"sum by (variant) (ray_shoprank_impressions_total{{{application}}})",
            "purchases": f'sum by (variant) (ray_shoprank_events_total{{{application}, event_type="purchase"}})',
            "revenue": f"sum by (variant) (ray_shoprank_revenue_total{{{application}}})",
            "trees": f"max by (variant) (ray_shoprank_model_trees{{{application}}})",
            "split": f"max by (variant) (ray_shoprank_split{{{application}}})",
            "catalogue": f"max by (variant) (ray_shoprank_catalogue_products{{{application}}})",
            "catalogue lag": f"max by (variant) (ray_shoprank_catalogue_lag_seconds{{{application}}})",
        }
        deadline, seen = time.monotonic() + 60.0, {}
        while time.monotonic() < deadline:
            seen = {name: {r["metric"].get("variant"): float(r["value"][1]) for r in prometheus.query(promql)}
                    for name, promql in wanted.items()}
            if all({"A", "B"} <= set(values) for values in seen.values()) and all(
                    seen["searches"][v] >= n for v, n in sent.items()):
                break
            time.sleep(1.0)
        for name, values in seen.items():
            assert {"A", "B"} <= set(values), f"{name} per variant not scraped within 60 s: {seen}"
        for variant, searches in sent.items():
            assert seen["searches"][variant] >= searches
            assert seen["purchases"][variant] >= 1 and seen["revenue"][variant] > 0
        assert seen["trees"]["B"] > 0  # B serves the XGBoost ranker, A the retrieval baseline: no trees
        assert seen["trees"]["A"] == 0
        assert seen["split"] == app.config.serve.split
        listed = read_table(app.run, "data", "products").num_rows  # each variant's replicas list the run's products
        assert seen["catalogue"] == {"A": listed, "B": listed} and max(seen["catalogue lag"].values()) < 5.0
        refused = prometheus.query(f'ray_shoprank_requests_total{{{application}, endpoint="/search", '
                                   'variant="none", status="4xx"}')
        writes = prometheus.query(f"sum by (operation) (ray_shoprank_event_store_write_seconds_count{{{application}}})")
        assert refused and {"events", "impressions"} <= {w["metric"]["operation"] for w in writes}

        groups = prometheus.get("/api/v1/rules")["groups"]
        loaded = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
        assert set(alert_names()) <= set(loaded) and set(loaded.values()) == {"ok"}, loaded
        for query in dashboard_queries():
            prometheus.query(query)  # each parses and evaluates (an error is a failed status)
        # each node's metrics export port, from the discovery file (beside it, Ray lists its dashboard's and its
        # autoscaler's, on fixed ports that another Ray instance of this machine may hold)
        nodes = {f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" for node in ray.nodes() if node["Alive"]}
        health = {t["labels"]["instance"]: t["health"] for t in prometheus.get("/api/v1/targets")["activeTargets"]}
        assert all(health.get(node) == "up" for node in nodes), (nodes, health)
    finally:
        prometheus.stop()
