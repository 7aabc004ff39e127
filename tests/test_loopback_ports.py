"""`serve run deployments/mepic.yaml` on one machine, as the README starts it, with no
cluster to join: the Ray instance it starts for itself (GCS, raylet, object manager,
agents, metrics exporters, workers) and the app listen on loopback only."""
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from helpers import shipped_config

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    """deployments/mepic.yaml as shipped, but with the tiny model, a free port and its own store."""
    path = tmp_path / "mepic.yaml"
    return path, shipped_config(path, tiny_model_dir, "loopback_store")


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    # Ray's gRPC servers listen on IPv6 sockets; bound to 127.0.0.1 they show as ::ffff:127.0.0.1.
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """serve run and everything under it: when it starts Ray itself, gcs_server, raylet,
    the agents and every worker descend from it, so other Ray instances and the
    machine's own services are never counted."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listening(procs: list[psutil.Process]) -> list[tuple[str, int, str, int, str]]:
    """(process name, pid, address, port, protocol) of every TCP listener and unconnected UDP socket."""
    found = []
    for p in procs:
        try:
            name, conns = p.name(), p.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
                found.append((name, p.pid, c.laddr.ip, c.laddr.port, "tcp"))
            elif c.type == socket.SOCK_DGRAM and c.laddr and not c.raddr:
                found.append((name, p.pid, c.laddr.ip, c.laddr.port, "udp"))
    return sorted(found)


def stop(proc: subprocess.Popen, tree: list[psutil.Process], timeout_s: float = 90) -> None:
    """SIGTERM as a service manager stops it (serve run shuts its Ray instance down), then
    SIGKILL for whatever of the tree it started is still there."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


def wait_up(proc: subprocess.Popen, root: psutil.Process, url: str, log: Path, engines: int,
            store: bool, timeout_s: float = 240) -> list[tuple[str, int, str, int, str]]:
    """Until the app answers on loopback and every actor the config starts listens: each
    replica on two ports (its Ray worker's and Serve's inter-deployment gRPC server, which
    starts once the replica is initialized), the chunk store on its worker's."""
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, log.read_text()[-4000:]
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    want = {"ray::ServeReplica:mepic:EngineServer": (engines, 2),
            "ray::ServeReplica:mepic:OpenAIIngress": (1, 2), **({"ray::ChunkStore": (1, 1)} if store else {})}
    while True:
        sockets = listening(process_tree(root))
        per_pid = Counter((name, pid) for name, pid, *_ in sockets)
        if all(sum(1 for (name, _), n in per_pid.items() if name.startswith(prefix) and n >= ports) >= count
               for prefix, (count, ports) in want.items()):
            return sockets
        assert proc.poll() is None and time.time() < deadline, (
            f"not every actor came up listening (want {want}):\n" + show(sockets) + "\n" + log.read_text()[-4000:])
        time.sleep(1)


def show(sockets) -> str:
    return "\n".join(f"  {name} (pid {pid}) {proto} {addr}:{port}" for name, pid, addr, port, proto in sockets)


def test_serve_run_listens_on_loopback_only(config):
    path, url = config
    # Its own temp dir (short: Ray's sockets live there) so serve run finds no other
    # instance's address file and starts Ray itself, as on a machine with no cluster.
    temp = tempfile.mkdtemp(prefix="mrlb")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = Path(temp) / "serve-run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([BIN / "serve", "run", str(path)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(proc.pid)
    seen: list[psutil.Process] = []
    try:
        app = yaml.safe_load(path.read_text())["applications"][0]
        engines = next(d for d in app["deployments"] if d["name"] == "EngineServer")["autoscaling_config"]["min_replicas"]
        sockets = wait_up(proc, root, url, log, engines, store="chunk_store" in app["args"])
        seen = process_tree(root)
        print(show(sockets))
        assert {"gcs_server", "raylet"} <= {s[0] for s in sockets}, show(sockets)
        assert ("127.0.0.1", int(url.rsplit(":", 1)[1])) in {(s[2], s[3]) for s in sockets}, show(sockets)
        offenders = [s for s in sockets if not is_loopback(s[2])]
        switch = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        assert not offenders, (
            "listening beyond loopback:\n" + show(offenders) + f"\nRAY_ENABLE_WINDOWS_OR_OSX_CLUSTER={switch!r} "
            "here; scripts/install.sh installs scripts/ray_loopback.pth, which defaults it to '0'")
    finally:
        # Also what was seen: Ray's processes outlive a serve run that died first.
        stop(proc, list(set(seen) | set(process_tree(root))))
        shutil.rmtree(temp, ignore_errors=True)
