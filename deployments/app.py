"""Ray Serve app: an OpenAI-compatible ingress (``deployments/ingress.py``) in front of
N engine replicas (``deployments/replica.py``), routed by chunk affinity
(``router/chunk_router.py``)."""
from deployments.ingress import OpenAIIngress
from deployments.replica import EngineServer


def build_app(args: dict | None = None):
    """Serve application builder: ``serve run deployments.app:build_app`` or the YAML."""
    args = dict(args or {})
    engine_cfg = dict(args.get("engine", {}))
    engine = EngineServer.bind(engine_cfg, args.get("chunk_store"), args.get("quality_gate"))
    return OpenAIIngress.bind(engine, args.get("model_name", "mepic"), engine_cfg.get("model"), args.get("server"))
