"""The monitoring stack for real: a Serve app of the tiny model on a local Ray with its
dashboard (which writes the service-discovery file), a real Prometheus server configured
from monitoring/prometheus.yml, traffic, and every query of the committed Grafana
dashboard run through Prometheus's HTTP API. The queries come from the dashboard JSON,
so a panel whose metric is renamed or misspelt fails here."""
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import affinity_router, free_port

ray = pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import prometheus_check as pc  # noqa: E402
import serve_page_screenshot as shot  # noqa: E402

# Every family the issue names for the dashboard, and Serve's own.
REQUIRED = ["ray_mepic_kv_blocks", "ray_mepic_chunk_hits_total", "ray_mepic_prompt_tokens_total",
            "ray_mepic_ttft_seconds_bucket", "ray_mepic_e2e_seconds_bucket", "ray_mepic_router_decisions_total",
            "ray_mepic_store_bytes", "ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy"]


def test_dashboard_is_grafana_json_and_covers_the_metrics():
    queries = pc.panel_queries()
    assert len({title for title, _, _ in queries}) >= 15
    missing = [m for m in REQUIRED if m not in pc.metric_names(queries)]
    assert not missing, f"no panel queries {missing}"
    config = pc.render_config("ray-temp")
    assert "ray-temp/session_latest/prom_metrics_service_discovery.json" in config and pc.PLACEHOLDER not in config


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is not on PATH (Debian package prometheus; .ci/run installs it)")
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    temp = tempfile.mkdtemp(prefix="mrmon")   # short: Ray's sockets live there
    with pytest.MonkeyPatch.context() as env:
        # Metrics reach the exporter every second instead of every ten; the dashboard's and
        # the autoscaler's exporters off their fixed ports, which another Ray may hold.
        env.setenv("RAY_metrics_report_interval_ms", "1000")
        env.setenv("DASHBOARD_METRIC_PORT", str(free_port()))
        env.setenv("AUTOSCALER_METRIC_PORT", str(free_port()))
        context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=free_port(), log_to_driver=False, _temp_dir=temp)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            engine = EngineServer.options(num_replicas=2, request_router_config=affinity_router(),
                                          ray_actor_options={"num_cpus": 0.4}).bind(
                {"mode": "mepic", "block_size": 8, "num_blocks": 1024, "model": tiny_model_dir},
                {"name": f"monitoring_store_{port}"})
            serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(engine, "mepic", tiny_model_dir),
                      name="mepic", route_prefix="/")
            yield f"http://127.0.0.1:{port}", temp, "http://" + context.dashboard_url
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def test_every_dashboard_query_has_data_in_a_real_prometheus(service):
    url, temp, _ = service
    with pc.Prometheus(pc.render_config(temp, scrape_interval="1s")) as prom:
        failures = pc.run_check(url, prom, window="5m", timeout_s=60)
        assert not failures, f"dashboard queries without data: {failures}\n" + prom.log_tail()
        # The repeated chunk hit the pool, and the new ones missed it.
        tiers = {r["metric"]["tier"]: float(r["value"][1])
                 for r in prom.query("sum by (tier) (ray_mepic_chunk_hits_total)")}
        assert tiers.get("hbm", 0) > 0 and tiers.get("miss", 0) > 0, tiers
        # The targets are the ones Ray's file lists (the config names no other).
        targets = prom.query('up{job="ray"}')
        assert targets and all(t["metric"]["instance"].startswith("127.0.0.1:") for t in targets)


def test_serve_page_screenshot(service, tmp_path):
    """scripts/serve_page_screenshot.py against this app (token auth on, as Ray's default)."""
    try:
        shot.find_chromium(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "serve.png"
    text = shot.screenshot(service[2], out, ["mepic", "EngineServer", "OpenAIIngress", "HEALTHY"], timeout_s=90)
    assert "RUNNING" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
