"""The router's ranking against an oracle that works on tokens, over replica states
that one machine cannot produce for real (chunks in the object store on some nodes
only). Queue lengths and routing stats are given; everything else is the real
router and the real ingress-side ``build_routing``.

The oracle never looks at a hash. Each replica holds whole documents (token lists)
in its pool, has some in the object store on its node, and has been sent earlier
prompts; the request is a real list of text and chunk items. Per replica, the oracle
walks the request's tokens and counts those the replica would not compute (the
README's "Routing" paragraph):

* a chunk whose tokens equal a document in the replica's pool: all its tokens;
  else one equal to a document in the store on its node: ``store_weight`` of them;
* the prompt text before the first chunk: the full blocks it shares, from the first
  token on, with the leading text of a prompt sent there before (a block counts
  only if every earlier block matches too).

The hashes the router sees are made with ``mepic_ray.hashing`` from the same tokens.
"""
import asyncio
import dataclasses
from types import SimpleNamespace

from hypothesis import event, given, settings, strategies as st
from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from mepic_ray.hashing import chunk_hash
from mepic_ray.routing import PAYLOAD_KEY, build_routing
from router.chunk_router import ChunkAffinityRouter
from router.ranker_config import RankerConfig

FP = "oracle-test-model"
BS = 4
STORE_W = 0.25          # a power of two: float scores stay exact, so ties are real ties
MIN_MATCH = 1           # the router's default min_match_tokens
ABS, REL = 4, 1.5       # the router's default imbalance thresholds


class Router(ChunkAffinityRouter):
    async def _probe_queue_lens(self, replicas, backoff_index):
        return [(r, self.fake_lens[r.replica_id]) for r in replicas]


LEGACY = {f.name: getattr(RankerConfig.legacy(), f.name) for f in dataclasses.fields(RankerConfig)
          if f.name not in ("store_weight", "min_match_tokens", "imbalanced_abs_threshold", "imbalanced_rel_threshold")}


def make_router(options=None):
    """The router with the first-shipped rules (``options`` None) or the defaults and ``options``."""
    r = Router(DeploymentID(name="EngineServer", app_name="t"), DeploymentHandleSource.UNKNOWN)
    r.initialize_state(store_weight=STORE_W, min_match_tokens=MIN_MATCH,
                       imbalanced_abs_threshold=ABS, imbalanced_rel_threshold=REL,
                       **(LEGACY if options is None else options))
    return r


# A toy tokenizer: text is space-separated token ids, so items and tokens map exactly.
def encode(text: str) -> list[int]:
    return [int(w) for w in text.split()]


def text(tokens) -> str:
    return " ".join(map(str, tokens))


def pending(items) -> SimpleNamespace:
    """What Serve hands the router: the ingress payload as the first argument."""
    return SimpleNamespace(args=[{"prompt": items, PAYLOAD_KEY: build_routing(items, encode, FP, BS)}], kwargs={})


# ---- the oracle: tokens only -------------------------------------------------------

def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def leading_text(items) -> list[int]:
    out = []
    for x in items:
        if isinstance(x, dict):
            break
        out += encode(x)
    return out


def reused_tokens(request, pool, stored, seen_prompts) -> float:
    """Tokens of ``request`` the replica would not compute. ``pool`` and ``stored``
    are lists of documents (token lists), ``seen_prompts`` the item lists sent there."""
    total = 0.0
    for x in request:
        if isinstance(x, dict):
            doc = encode(x["chunk"])
            if any(doc == d for d in pool):
                total += len(doc)
            elif any(doc == d for d in stored):
                total += STORE_W * len(doc)
    lead = leading_text(request)
    shared = max((common_prefix(lead, leading_text(p)) for p in seen_prompts), default=0)
    return total + shared // BS * BS       # whole blocks only, from the first token on


def imbalanced(load: dict) -> bool:
    hi, lo = max(load.values()), min(load.values())
    return hi - lo > ABS and hi > REL * lo


def oracle_key(decision: str, score: float, load: int, free: int, routed: int) -> tuple:
    """Ranking keys, smaller first. Affinity: most reused tokens, ties to the least
    loaded, then the most free KV blocks. Imbalanced queues: the least loaded, then the
    most free blocks. Nothing to reuse: the least loaded, then the replica sent the
    fewest requests (spreads unrelated traffic)."""
    if decision == "affinity":
        return (-score, load, -free)
    if decision == "load_fallback":
        return (load, -free)
    return (load, routed)


# ---- scenarios -----------------------------------------------------------------------

tokens = st.lists(st.integers(0, 3), max_size=6)     # a tiny vocabulary: shared blocks are common


@st.composite
def scenario(draw):
    docs = draw(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=9), min_size=1, max_size=5))
    doc_ix = st.integers(0, len(docs) - 1)
    # Leading texts are made of a few distinct blocks in varying orders, so that a block
    # of the request often appears in a seen prompt at another position (or after a
    # different block): the prefix counts only where every earlier block matches too.
    blocks = draw(st.lists(st.lists(st.integers(0, 3), min_size=BS, max_size=BS), min_size=1, max_size=3))

    def some_blocks(min_size=0):
        return [t for i in draw(st.lists(st.integers(0, len(blocks) - 1), min_size=min_size, max_size=4))
                for t in blocks[i]]
    base = some_blocks(min_size=1)           # a leading text many prompts share part of

    def some_text():
        return some_blocks() if draw(st.booleans()) else draw(tokens)

    def draw_prompt(max_chunks):
        """Leading text (part of ``base``, then more; maybe split in two text items),
        chunks (maybe with text between them), then the question. Text after the first
        chunk is built like the leading text, so it could pass for a shared prefix."""
        cut = draw(st.just(len(base)) | st.sampled_from(range(0, len(base) + 1, BS)) | st.integers(0, len(base)))
        lead = base[:cut] + some_text()
        split = draw(st.integers(0, len(lead)))
        items = [text(t) for t in (lead[:split], lead[split:]) if t]
        for c in draw(st.lists(doc_ix, max_size=max_chunks)):
            items.append({"chunk": text(docs[c])})
            if draw(st.booleans()):
                items.append(text(some_text()))
        return items + [text(some_text()) or "9"]

    n = draw(st.integers(2, 4))
    replicas = []
    for _ in range(n):
        replicas.append({"pool": sorted(draw(st.sets(doc_ix))), "stored": sorted(draw(st.sets(doc_ix))),
                         "history": [draw_prompt(2) for _ in range(draw(st.integers(0, 3)))],
                         "queue": draw(st.integers(0, 3)), "free": draw(st.integers(0, 2))})
    if draw(st.booleans()):        # one busy replica: sometimes the queues are imbalanced
        replicas[draw(st.integers(0, n - 1))]["queue"] += draw(st.sampled_from([2, 8]))
    return docs, replicas, draw_prompt(4), draw(st.permutations(range(n)))


def rendezvous(replica_id, key) -> int:
    import hashlib
    return int.from_bytes(hashlib.blake2b(f"{replica_id}\0{key}".encode(), digest_size=8).digest(), "little")


def run_scenario(case, options):
    """Replays the scenario through the adapter; returns what the token oracle needs."""
    docs, states, request, order = case
    router = make_router(options)
    replicas = [SimpleNamespace(replica_id=f"r{i}", routing_stats={
        "chunks": [chunk_hash(FP, docs[d], BS) for d in s["pool"]],       # what the replica reports
        "stored": [chunk_hash(FP, docs[d], BS) for d in s["stored"]],
        "free_blocks": s["free"]}) for i, s in enumerate(states)]
    router.fake_lens = {r.replica_id: s["queue"] for r, s in zip(replicas, states)}
    # The router learns prefixes (and chunks sent since the last stats) from what it
    # routes: replay each replica's history through it, that replica the only candidate.
    for r, s in zip(replicas, states):
        for p in s["history"]:
            assert asyncio.run(router._choose([r], pending(p)))[0] == [r]
    tiers = asyncio.run(router._choose([replicas[i] for i in order], pending(request)))
    ranked = router.last_ranking.order                           # the ranker's full order
    assert sorted(r.replica_id for t in tiers for r in t) == sorted(router.fake_lens)   # every replica, once
    assert [r.replica_id for r in tiers[0]] == ranked[:1]        # the router knows where it goes
    score = {}
    for r, s in zip(replicas, states):
        pool = [docs[d] for d in s["pool"]] + [encode(x["chunk"]) for p in s["history"]   # served since
                                               for x in p if isinstance(x, dict)]
        score[r.replica_id] = reused_tokens(request, pool, [docs[d] for d in s["stored"]], s["history"])
    return router, replicas, states, score, ranked


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_ranking_matches_token_oracle(case):
    """The rules as first shipped (``RankerConfig.legacy()``): one imbalance test over
    all candidates."""
    docs, states, request, order = case
    router, replicas, states, score, ranked = run_scenario(case, None)
    load = router.fake_lens
    key = {}
    decision = ("load_fallback" if imbalanced(load) else
                "no_match" if max(score.values()) < MIN_MATCH else "affinity")
    for r, s in zip(replicas, states):
        key[r.replica_id] = oracle_key(decision, score[r.replica_id], s["queue"], s["free"], len(s["history"]))
    event(decision)   # pytest --hypothesis-show-statistics: how often each path is taken
    if decision == "affinity":
        best = [k for k in key if key[k][0] == min(key.values())[0]]
        event(f"affinity: {len(best)} replica(s) with the best score")
        event(f"affinity: prefix reuse counts: {any(reused_tokens(request, [], [], s['history']) for s in states)}")
        event(f"affinity: store copies count: {any(v % 1 for v in score.values())}")
    assert router.last_decision == decision
    # The first tier is the oracle's best, and the order is the oracle's wherever the
    # keys differ (replicas with equal keys may come in any order).
    assert key[ranked[0]] == min(key.values()), (score, key, ranked)
    assert [key[k] for k in ranked] == sorted(key.values()), (score, key, ranked)


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_ranking_matches_token_oracle_default_rules(case):
    """The default rules: a replica loses its affinity only when it is itself
    overloaded (its queue more than ABS above the shortest and more than REL times it);
    the request then goes to the best-scoring replica that is not. Nothing to reuse, or
    only on overloaded replicas: the shortest queue, ties to the highest rendezvous hash
    of (replica, the request's smallest chunk hash) when it has chunks."""
    docs, states, request, order = case
    router, replicas, states, score, ranked = run_scenario(case, {})
    load, free = router.fake_lens, {r.replica_id: s["free"] for r, s in zip(replicas, states)}
    lo = min(load.values())
    over = {k: load[k] - lo > ABS and load[k] > REL * lo for k in load}
    fit = [k for k in load if score[k] >= MIN_MATCH and not over[k]]
    if fit:
        decision = "affinity"
        key = {k: (-score[k], load[k], -free[k]) for k in load}
        best = min(key[k] for k in fit)
        assert not over[ranked[0]] and key[ranked[0]] == best, (score, load, ranked)
        assert [key[k] for k in ranked[1:]] == sorted(key[k] for k in ranked[1:])
    else:
        decision = "load_fallback" if max(score.values()) >= MIN_MATCH else "no_match"
        hashes = [chunk_hash(FP, encode(x["chunk"]), BS) for x in request if isinstance(x, dict)]
        if hashes:
            key = {k: (load[k], -rendezvous(k, min(hashes))) for k in load}
        elif decision == "load_fallback":
            key = {k: (load[k], -free[k]) for k in load}
        else:
            key = {k: (load[k], len(s["history"])) for k, s in zip(load, states)}
        assert [key[k] for k in ranked] == sorted(key.values()), (score, load, ranked)
    event(decision)
    assert router.last_decision == decision


def test_oracle_on_a_hand_made_case():
    """The oracle's arithmetic, checked by hand, so it cannot drift with the router."""
    a, b = [1, 2, 3, 4, 5], [2, 2, 2]
    req = [text([0, 1, 2, 3, 0, 1, 2, 3, 3]), {"chunk": text(a)}, {"chunk": text(b)}, "7"]
    seen = [[text([0, 1, 2, 3, 0, 1, 2, 0]), {"chunk": text(b)}, "7"]]      # shares 7 tokens: one block
    assert reused_tokens(req, pool=[a], stored=[b], seen_prompts=seen) == 5 + 0.25 * 3 + 4
    assert reused_tokens(req, pool=[[1, 2, 3, 4]], stored=[], seen_prompts=[]) == 0   # a is not [1,2,3,4]
