"""What the object-store tier's tests share: a tiny model's documents and prompts, a
store of its own per test, and a brute-force count of the pages MEPIC keeps."""
import uuid

import pytest
import ray

from mepic_ray import Chunk, SamplingParams, StoreConfig
from mepic_ray.tier.chunk_store import get_or_create_store

BS = 8
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
DOCS = [f"document {i}: " + " ".join(f"w{i}x{j}" for j in range(6 + 3 * i)) for i in range(6)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A local Ray for the importing test module (imported there, so pytest finds it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def store_cfg(**kw) -> StoreConfig:
    return StoreConfig(name=f"store-{uuid.uuid4().hex[:8]}", **kw)


def store_of(cfg: StoreConfig):
    return get_or_create_store(cfg.name, cfg.namespace, cfg.budget_bytes)


def store_stats(cfg: StoreConfig) -> dict:
    return ray.get(store_of(cfg).stats.remote())


def prompt(*docs):
    return ["System: answer briefly. ", *map(Chunk, docs), " Question: which?"]


def first_logits(llm, p):
    out = llm.generate(p, GREEDY)[0]
    return out, llm.engine.last_logits[0].clone()


def mepic_shared_tokens(llm, doc):
    """Brute force: a chunk is front-padded to whole pages; MEPIC keeps all but the first page."""
    n = len(llm.engine.encode(doc))
    return max(0, n - (BS - (-n) % BS))
