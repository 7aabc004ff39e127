"""Prometheus for a running mepic-ray service, and a check that the Grafana dashboard's
every query has data.

    python scripts/prometheus_check.py config > prometheus.yml
    python scripts/prometheus_check.py check --url http://127.0.0.1:8000

`config` fills Ray's temp dir into monitoring/prometheus.yml. `check` starts its own
Prometheus (the `prometheus` binary, on a free loopback port, storage in a temporary
directory) with that config, sends two waves of traffic (completions and chats with
chunks, one chunk repeated so it hits, a stream, a refused request), then runs every
query of monitoring/grafana/mepic-dashboard.json against Prometheus's HTTP API and
exits 1 naming each query that has no data. tests/test_monitoring.py runs the same
functions against a test service. Standard library only: it runs wherever Ray does."""
from __future__ import annotations

import argparse
import json
import math
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "monitoring" / "grafana" / "mepic-dashboard.json"
TEMPLATE = REPO / "monitoring" / "prometheus.yml"
PLACEHOLDER = "RAY_TEMP_DIR"
# Grafana's own interval variables; a window long enough to hold both traffic waves.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")

SHARED_DOC = ("The Amazon river carries more water than any other river, draining a basin of about seven "
              "million square kilometres across nine countries.")


def wave_doc(run: str, wave: int) -> str:
    # New to the service on every run: a chunk the store already holds would not be put
    # again, and the store's gauges only move on puts.
    return (f"Survey note {run}-{wave}: the glacier in valley {wave} retreated by {40 + wave} metres last "
            "year, measured from the moraine markers.")


# --- the dashboard ---------------------------------------------------------------------

def panel_queries(dashboard: Path = DASHBOARD, window: str = "5m") -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) for every target of every panel, with the dashboard's
    template variables at their "All" value and Grafana's intervals at ``window``, as
    Grafana would send them."""
    dash = json.loads(Path(dashboard).read_text())
    subs = {f"${v['name']}": v.get("allValue", ".*") for v in dash["templating"]["list"] if v["type"] == "query"}
    subs.update({name: window for name in GRAFANA_INTERVALS})
    out = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        if not panel.get("targets"):
            raise ValueError(f"panel {panel['title']!r} has no query")
        for t in panel["targets"]:
            expr = t["expr"]
            # Longest names first: $replica must not eat the start of a longer variable.
            for name in sorted(subs, key=len, reverse=True):
                expr = expr.replace(name, subs[name])
            if "$" in expr:
                raise ValueError(f"panel {panel['title']!r}: unknown variable in {expr!r}")
            out.append((panel["title"], t.get("legendFormat", t["refId"]), expr))
    return out


def metric_names(queries) -> set[str]:
    return {m for _, _, expr in queries for m in re.findall(r"\bray_[a-z0-9_]+", expr)}


# --- Prometheus ------------------------------------------------------------------------

def render_config(ray_temp_dir: str, scrape_interval: str | None = None) -> str:
    text = TEMPLATE.read_text().replace(PLACEHOLDER, str(Path(ray_temp_dir).resolve()))
    if scrape_interval:
        text = re.sub(r"(scrape_interval|scrape_timeout|evaluation_interval|refresh_interval): \S+",
                      rf"\1: {scrape_interval}", text)
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Prometheus:
    """A Prometheus server of its own: loopback, a free port, a throwaway TSDB."""

    def __init__(self, config_text: str, binary: str | None = None):
        self.binary = binary or shutil.which("prometheus")
        if not self.binary:
            raise FileNotFoundError("the prometheus binary is not on PATH (Debian: apt-get install prometheus)")
        self.config_text, self.proc = config_text, None

    def __enter__(self) -> "Prometheus":
        self.dir = Path(tempfile.mkdtemp(prefix="mepic-prom-"))
        (self.dir / "prometheus.yml").write_text(self.config_text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("Prometheus did not start:\n" + self.log_tail())
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text()[-n:]

    def query(self, expr: str) -> list[dict]:
        body = get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        if body.get("status") != "success":
            raise RuntimeError(f"{expr}: {body}")
        return body["data"]["result"]

    def has_data(self, expr: str) -> bool:
        """At least one series with a finite value (a quantile of a histogram that saw
        nothing in the window is NaN: no data)."""
        return any(math.isfinite(float(r["value"][1])) for r in self.query(expr))

    def wait_for(self, exprs, timeout_s: float) -> list[str]:
        """Polls until every expression has data or time is up; returns those that have none."""
        deadline, missing = time.time() + timeout_s, list(exprs)
        while True:
            missing = [e for e in missing if not self.has_data(e)]
            if not missing or time.time() > deadline:
                return missing
            time.sleep(1)


# --- traffic ---------------------------------------------------------------------------

def post(url: str, path: str, body: dict, timeout: float = 120) -> int:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()        # a stream too: read to its end
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def send_traffic(url: str, run: str, wave: int) -> list[int]:
    """One wave: a new chunk (a miss) next to SHARED_DOC, the same two again reordered and
    streamed (hits), a chat with SHARED_DOC, a prompt without chunks, and a refused body."""
    docs = [wave_doc(run, wave), SHARED_DOC]
    ask = {"prompt": "\nQ: What was measured?\nA:", "max_tokens": 4, "temperature": 0}
    return [
        post(url, "/v1/completions", {**ask, "prefix": "Answer from the notes.\n", "chunks": docs}),
        post(url, "/v1/completions", {**ask, "prefix": "Answer from the notes.\n", "chunks": docs[::-1],
                                      "stream": True}),
        post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Which river is largest?"}],
                                           "chunks": [SHARED_DOC], "max_tokens": 4, "temperature": 0}),
        post(url, "/v1/completions", {"prompt": f"Plain prompt {run} number {wave}.", "max_tokens": 2}),
        post(url, "/v1/completions", {"max_tokens": 2}),        # no prompt: a 400 for the status panel
    ]


def run_check(url: str, prom: Prometheus, window: str = "5m", timeout_s: float = 120,
              dashboard: Path = DASHBOARD, log=print) -> dict[str, list[str]]:
    """Traffic in two waves (counters need a sample before an increase for rate() to see
    one), then every dashboard query; returns {panel: [queries without data]}."""
    queries = panel_queries(dashboard, window)
    run, t0 = secrets.token_hex(4), time.time()
    missing = prom.wait_for(['up{job="ray"} == 1'], timeout_s)
    if missing:
        raise RuntimeError("Prometheus found no Ray target to scrape: is the service-discovery file there?\n"
                           + prom.log_tail())
    statuses = send_traffic(url, run, 0)
    log(f"wave 0: {statuses}")
    # Every metric the dashboard reads has a sample before the second wave (each process
    # reports on its own clock), so the second wave is an increase rate() can see.
    absent = set(prom.wait_for(sorted(metric_names(queries)), timeout_s))
    statuses = send_traffic(url, run, 1)
    log(f"wave 1: {statuses}")
    # A query over a metric that never appeared has no data: no second wait for it.
    dead = {q for _, _, q in queries if metric_names([("", "", q)]) & absent}
    missing = dead | set(prom.wait_for([q for _, _, q in queries if q not in dead], timeout_s))
    failures: dict[str, list[str]] = {}
    for title, legend, expr in queries:
        if expr in missing:
            failures.setdefault(title, []).append(expr)
        log(f"{'NO DATA' if expr in missing else 'ok':8} {title} [{legend}]")
    log(f"{len(queries) - len(missing)}/{len(queries)} queries have data ({time.time() - t0:.0f} s)")
    return failures


def default_ray_temp_dir() -> str:
    from ray._common.utils import get_default_ray_temp_dir
    return get_default_ray_temp_dir()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    cfg = sub.add_parser("config", help="print monitoring/prometheus.yml for this machine's Ray")
    chk = sub.add_parser("check", help="start Prometheus, send traffic, check every dashboard query")
    for p in (cfg, chk):
        p.add_argument("--ray-temp-dir", default=None,
                       help="Ray's temp dir (what ray start --temp-dir took); default: Ray's, which follows RAY_TMPDIR")
    chk.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    chk.add_argument("--scrape-interval", default="2s")
    chk.add_argument("--window", default="5m", help="what $__rate_interval stands for in the queries")
    chk.add_argument("--timeout", type=float, default=180, help="seconds to wait at each step")
    args = ap.parse_args(argv)
    temp = args.ray_temp_dir or default_ray_temp_dir()
    if args.cmd == "config":
        print(render_config(temp), end="")
        return 0
    with Prometheus(render_config(temp, args.scrape_interval)) as prom:
        print(f"Prometheus on {prom.url}")
        failures = run_check(args.url, prom, args.window, args.timeout)
    for title, exprs in failures.items():
        print(f"no data: {title}: " + "; ".join(exprs), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
