"""A headless-Chromium screenshot of the Ray dashboard's Serve page.

    python scripts/serve_page_screenshot.py --dashboard http://127.0.0.1:8265 --out monitoring/ray-dashboard-serve.png

The Serve page is a React app that fills itself from the dashboard's API, so a fixed
delay either wastes time or shoots an empty table: this drives Chromium over its DevTools
protocol, waits (bounded) until the page's text shows every --wait-for string, then
captures it. With token auth on (Ray's default for a local cluster when a token exists)
the token goes in as the dashboard's own login cookie: RAY_AUTH_TOKEN, else the file
RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, where Ray keeps it. Needs `chromium`
(Debian: apt-get install chromium) and aiohttp, which Ray's dashboard already depends on."""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

COOKIE = "ray-authentication-token"     # ray._private.authentication.authentication_constants
# A closed network: without these Chromium waits on Google's services before it renders.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def find_chromium(explicit: str | None) -> str:
    for name in ([explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no chromium binary on PATH (Debian: apt-get install chromium)")


def auth_token(dashboard: str) -> str | None:
    with urllib.request.urlopen(dashboard + "/api/authentication_mode", timeout=10) as r:
        if json.loads(r.read()).get("authentication_mode") != "token":
            return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        raise RuntimeError(f"the dashboard wants a token and {path} does not exist: set RAY_AUTH_TOKEN")
    return path.read_text().strip()


class DevTools:
    """Commands to one page over its DevTools websocket (events are skipped)."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def __call__(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})


async def capture(devtools_port: int, url: str, out: Path, wait_for: list[str], token: str | None,
                  width: int, height: int, timeout_s: float, settle_s: float) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = DevTools(ws)
            await cdp("Network.enable")
            if token:
                await cdp("Network.setCookie", name=COOKIE, value=token, url=url, httpOnly=True)
            await cdp("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
            await cdp("Page.enable")
            await cdp("Page.navigate", url=url)
            deadline, text = time.time() + timeout_s, ""
            while True:
                res = await cdp("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                returnByValue=True)
                text = res.get("result", {}).get("value", "")
                if all(w in text for w in wait_for):
                    break
                if time.time() > deadline:
                    raise TimeoutError(f"after {timeout_s:.0f} s the page does not show {wait_for}; it shows:\n"
                                       + text[:2000])
                await asyncio.sleep(0.5)
            await asyncio.sleep(settle_s)     # charts and status icons arrive after the text
            shot = await cdp("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
            return text


def screenshot(dashboard: str, out: Path, wait_for: list[str], chromium: str | None = None, width: int = 1600,
               height: int = 1000, timeout_s: float = 120, settle_s: float = 3) -> str:
    dashboard = dashboard.rstrip("/")
    token = auth_token(dashboard)
    profile = tempfile.mkdtemp(prefix="mepic-chromium-")
    log = Path(profile) / "chromium.log"     # a file, not a pipe: a full pipe would stall Chromium
    with open(log, "w") as sink:
        proc = subprocess.Popen([find_chromium(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Port 0: Chromium picks a free one and writes it here.
        port_file, deadline = Path(profile) / "DevToolsActivePort", time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("chromium did not open its DevTools port:\n" + log.read_text()[-2000:])
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        return asyncio.run(capture(port, dashboard + "/#/serve", out, wait_for, token, width, height,
                                   timeout_s, settle_s))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the Ray dashboard's URL")
    ap.add_argument("--out", default="monitoring/ray-dashboard-serve.png")
    ap.add_argument("--wait-for", action="append", default=None,
                    help="text the page must show before the shot (repeatable; default: the app and its deployments)")
    ap.add_argument("--chromium", default=None, help="the browser binary (default: chromium on PATH)")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for the page")
    args = ap.parse_args(argv)
    out = Path(args.out)
    wait_for = args.wait_for or ["mepic", "RUNNING", "EngineServer", "OpenAIIngress", "HEALTHY"]
    screenshot(args.dashboard, out, wait_for, args.chromium, args.width, args.height, args.timeout)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
