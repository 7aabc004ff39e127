"""Which queue lengths the chunk-affinity router probes: Serve's cache for every
candidate, a probe where it has none and for the replicas the ranking would pick.
Written as a coroutine so that the Serve adapter awaits real probes and the fleet
simulator runs it to completion synchronously (``run_sync``). Standard library only.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence

from mepic_ray.routing import RoutingInfo
from router.ranking import ChunkAffinityRanker, Ranking


async def rank_probing(ranker: ChunkAffinityRanker, info: RoutingInfo, candidates: Sequence[Hashable],
                       cached: Mapping[Hashable, int | None],
                       probe: Callable[[list], Awaitable[Mapping[Hashable, int | None]]],
                       max_rounds: int = 3) -> tuple[Ranking, int]:
    """Rank on cached queue lengths, probing only what the cache lacks and then the
    ``probe_top`` best-ranked replicas not probed yet, re-ranking until the best ones
    have all been probed (at most ``max_rounds`` times). With ``probe_top`` 0 every
    candidate is probed. A failed probe (None) leaves the cached value, or 0. Returns
    the ranking and how many probes were sent."""
    k = ranker.config.probe_top
    load = dict(cached) if len(cached) == len(candidates) and cached.keys() >= set(candidates) else \
        {r: cached.get(r) for r in candidates}
    todo = list(candidates) if not k else [r for r, v in load.items() if v is None]
    for r in todo:
        if load[r] is None:
            load[r] = 0
    fresh: set = set()
    probed = 0
    ranking = None
    for _ in range(max_rounds + 1):
        if todo:
            got = await probe(todo)
            probed += len(todo)
            fresh.update(todo)
            news = {r: v for r, v in got.items() if v is not None and v != load.get(r)}
            load.update(news)
            if ranking is not None and not news:
                break          # the replicas it picks are as loaded as assumed: it stands
        ranking = ranker.rank(info, candidates, load)
        todo = [r for r in ranking.top(k) if r not in fresh] if k else []
        if not todo:
            break
    return ranking, probed


def run_sync(coro):
    """Run a coroutine that never suspends (its awaits return at once) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine suspended; run it on an event loop")
