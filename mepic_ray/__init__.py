"""mepic-ray: position-independent chunk KV caching (MEPIC) for LLM serving."""
from mepic_ray.config import EngineConfig, StoreConfig
from mepic_ray.segments import Chunk, PromptError, Text
from mepic_ray.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "StoreConfig", "SamplingParams", "Chunk", "Text", "PromptError",
           "RequestTooLargeError"]


def __getattr__(name):
    # Lazy: `import mepic_ray.hashing` (the router's only need) must not pull torch.
    if name == "LLM":
        from mepic_ray.llm import LLM
        return LLM
    if name == "LLMEngine":
        from mepic_ray.engine import LLMEngine
        return LLMEngine
    if name == "RequestTooLargeError":
        from mepic_ray.core.kv_manager import RequestTooLargeError
        return RequestTooLargeError
    raise AttributeError(name)
