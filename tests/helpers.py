"""Small helpers shared by the tests that start a real service."""
import socket
import time


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests listen on loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_actor_name(app: str, unique_id: str, deployment: str = "EngineServer") -> str:
    return f"SERVE_REPLICA::{app}#{deployment}#{unique_id}"


def shipped_config(path, model_dir: str, store_name: str) -> str:
    """deployments/mepic.yaml as shipped, written to ``path`` with the tiny model, a free
    port and its own chunk store; returns the base URL."""
    from pathlib import Path
    import yaml
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "deployments" / "mepic.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]["args"]
    app["engine"]["model"] = model_dir
    # The gate still runs, but a random test model's fidelity is not what is tested here.
    app["quality_gate"]["on_failure"] = "warn"
    app["engine"]["kv_cache_memory_fraction"] = 0.01    # the tiny model's pages are tiny: plenty
    app["chunk_store"]["name"] = f"{store_name}_{port}"
    Path(path).write_text(yaml.safe_dump(cfg))
    return f"http://127.0.0.1:{port}"


def actor_pid(name: str, namespace: str = "serve") -> int:
    """The PID of a named actor's process (to SIGKILL it, or read its memory)."""
    import os
    import ray
    actor = ray.get_actor(name, namespace=namespace)
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def rss_bytes(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


def live_replicas(app: str, n: int, dead: set[str], deployment: str = "EngineServer") -> set[str]:
    """Ids of the replicas that are really alive, or an empty set while Serve reports
    fewer than ``n`` running (its status counts a killed replica as running until the
    health check fails, so the named actors are checked too)."""
    import ray
    from ray import serve
    status = serve.status().applications[app].deployments[deployment]
    if status.replica_states.get("RUNNING", 0) < n:
        return set()
    prefix = replica_actor_name(app, "", deployment)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {name[len(prefix):] for name in names if name.startswith(prefix)} - dead


def wait_replicas(app: str, n: int, dead: set[str], timeout_s: float = 180,
                  deployment: str = "EngineServer") -> set[str]:
    import ray
    from ray import serve
    # The same n replicas for 3 s in a row: just after a kill, Serve can count the dead
    # replica as running while its replacement's actor already exists, and a moment later
    # count neither (the replacement still starting).
    deadline = time.time() + timeout_s
    stable_since, last = time.time(), set()
    while time.time() < deadline:
        live = live_replicas(app, n, dead, deployment)
        if live != last:
            stable_since, last = time.time(), live
        elif len(live) == n and time.time() - stable_since >= 3.0:
            break
        time.sleep(0.5)
    # On failure say what Serve saw, so a slow or stuck replacement can be told apart.
    assert len(live) == n, (live, dead, serve.status().applications[app].deployments[deployment],
                            ray.available_resources())
    time.sleep(1.0)     # the ingress's router hears of a new replica shortly after
    return live


def start_local_serve(num_cpus: int, **ray_kwargs) -> str:
    """A local Ray instance and Serve's HTTP proxy on a free loopback port; returns the
    base URL. ``num_cpus`` is logical: fault tests give headroom so a replacement
    replica is never held back by the reservation of one still being stopped."""
    import ray
    from ray import serve
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **ray_kwargs)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except BaseException:
        ray.shutdown()
        raise
    return f"http://127.0.0.1:{port}"


def affinity_router():
    """The chunk-affinity router with routing stats twice a second (tests want them fresh)."""
    from ray.serve.config import RequestRouterConfig
    return RequestRouterConfig(request_router_class="router.chunk_router:ChunkAffinityRouter",
                               request_routing_stats_period_s=0.5)


def deploy_one_tiny_replica(model_dir: str, server: dict, **engine) -> None:
    """The app with one engine replica of a test model (so every request and the stats
    route share one pool) and a short context, under the name "mepic" at "/"; ``engine``
    overrides the engine's settings."""
    from ray import serve
    from deployments.app import EngineServer, OpenAIIngress
    engine = EngineServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5}).bind(
        {"mode": "mepic", "block_size": 8, "num_blocks": 512, "max_model_len": 256, "model": model_dir, **engine})
    serve.run(OpenAIIngress.options(ray_actor_options={"num_cpus": 0.2}).bind(engine, "mepic", model_dir, server),
              name="mepic", route_prefix="/")
