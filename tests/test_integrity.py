"""Concurrency integrity: random chunk layouts submitted to the asynchronous engine
with random interleavings (arrivals while others prefill, decode or compile the
same chunks) give exactly the outputs of the same requests run one by one on a
fresh engine: `full` mode where MEPIC is exact (no chunks), `mepic` with an empty
cache otherwise."""
import asyncio

from hypothesis import HealthCheck, given, settings, strategies as st

from mepic_ray import LLM, Chunk, SamplingParams
from mepic_ray.async_engine import AsyncLLMEngine
from mepic_ray.config import EngineConfig

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
words = st.text(alphabet="abcdefgh ,.", min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), docs=st.lists(words, min_size=1, max_size=4, unique=True),
       n=st.integers(2, 6), pool=st.sampled_from([48, 512]))
def test_interleaved_requests_equal_one_by_one(tiny_model_dir, data, docs, n, pool):
    prompts = []
    for i in range(n):
        if data.draw(st.booleans(), label=f"chunked {i}"):
            chosen = data.draw(st.lists(st.sampled_from(docs), min_size=1, max_size=4), label=f"chunks {i}")
            prompts.append([f"S{i}: ", *map(Chunk, chosen), data.draw(words, label=f"question {i}")])
        else:
            prompts.append(f"S{i}: " + data.draw(words, label=f"text {i}"))
    delays = [data.draw(st.sampled_from([0, 0, 0.001, 0.01, 0.05]), label=f"delay {i}") for i in range(n)]
    # A pool of 48 blocks makes requests wait for pages and evict each other's chunks.
    engine = AsyncLLMEngine(EngineConfig(model=tiny_model_dir, block_size=8, num_blocks=pool))

    async def one(i):
        await asyncio.sleep(delays[i])
        return [o async for o in engine.generate(prompts[i], GREEDY, f"r{i}")][-1]

    async def run():
        return await asyncio.gather(*(one(i) for i in range(n)))
    outs = asyncio.run(asyncio.wait_for(run(), 120))
    for p, out in zip(prompts, outs):
        mode = "full" if isinstance(p, str) else "mepic"
        alone = LLM(tiny_model_dir, mode=mode, block_size=8, num_blocks=512).generate(p, GREEDY)[0]
        assert out.token_ids == alone.token_ids, p
    assert engine.stats()["used_blocks"] == 0
