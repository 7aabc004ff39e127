"""Tenants without a service: the API-key file and variable, the Authorization check,
the public-chunk payload forms, and hash isolation between namespaces checked against
a brute-force oracle that works on tokens and namespace names only (never on a hash)."""
import asyncio
import itertools
import json
from types import SimpleNamespace

import pytest

from deployments.auth import ENV_VAR, ApiKeyError, ApiKeys, Unauthorized, load_api_keys
from deployments.protocol import ApiError, parse_chat, parse_completion
from mepic_ray.core.layout import build_layout
from mepic_ray.hashing import KIND_PROMPT, chunk_hash
from mepic_ray.routing import (PAYLOAD_KEY, PublicChunk, build_routing, payload_items, prompt_items,
                               tenant_layout)
from mepic_ray.segments import Chunk, PromptError, Text, tokenize_segments

KEY_A, KEY_B, KEY_A2 = "sk-Alpha-0123456789abcdef", "sk-Bravo-0123456789abcdef", "sk-Alpha-rotated-00000000"
FP, BS = "tenant-test-model", 4


def write(tmp_path, doc) -> str:
    p = tmp_path / "keys.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


# ---- the key file -------------------------------------------------------------------

def test_key_file_maps_keys_to_tenants(tmp_path):
    keys = load_api_keys(write(tmp_path, {"keys": {KEY_A: "team-a", KEY_B: "team_b", KEY_A2: "team-a"}}), environ={})
    assert keys.tenant(f"Bearer {KEY_A}") == "team-a" and keys.tenant(f"Bearer {KEY_A2}") == "team-a"
    assert keys.tenant(f"bearer  {KEY_B} ") == "team_b"        # the scheme is case-insensitive
    assert KEY_A not in repr(keys) and KEY_B not in repr(keys)


def test_no_file_and_no_variable_means_no_tenants():
    assert load_api_keys(None, environ={}) is None


def test_the_variable_holds_the_same_document(tmp_path):
    keys = load_api_keys(None, environ={ENV_VAR: json.dumps({"keys": {KEY_B: "b"}})})
    assert keys.tenant(f"Bearer {KEY_B}") == "b"
    with pytest.raises(ApiKeyError, match="both"):
        load_api_keys(write(tmp_path, {"keys": {KEY_A: "a"}}), environ={ENV_VAR: json.dumps({"keys": {KEY_B: "b"}})})


@pytest.mark.parametrize("doc, reason", [
    ("{not json", "not JSON"),
    ("", "not JSON"),
    ([KEY_A, "a"], "nothing else"),
    ({"keys": {KEY_A: "a"}, "extra": 1}, "nothing else"),
    ({"keys": [KEY_A]}, "nothing else"),
    ({"keys": {}}, "at least one key"),
    ({"keys": {"short-key": "a"}}, "key 1 must be 16"),
    ({"keys": {KEY_A: "a", "has a space in it!!": "b"}}, "key 2 must be"),
    ({"keys": {KEY_A: "Team A"}}, "tenant of key 1 must match"),
    ({"keys": {KEY_A: ""}}, "tenant of key 1 must match"),
    ({"keys": {KEY_A: 7}}, "tenant of key 1 must match"),
    ({"keys": {KEY_A: "public"}}, "'public'"),
    ('{"keys": {"%s": "a", "%s": "b"}}' % (KEY_A, KEY_A), "key 2 appears twice"),
])
def test_malformed_key_files_are_refused_with_a_reason(tmp_path, doc, reason):
    path = write(tmp_path, doc)
    with pytest.raises(ApiKeyError) as e:
        load_api_keys(path, environ={})
    assert reason in str(e.value) and path in str(e.value)
    assert KEY_A not in str(e.value)      # a key is named by its position, never by itself


def test_a_tenant_that_looks_like_a_key_is_not_echoed(tmp_path):
    with pytest.raises(ApiKeyError) as e:     # key and tenant swapped by mistake
        load_api_keys(write(tmp_path, {"keys": {"team-a-long-enough": KEY_A}}), environ={})
    assert KEY_A not in str(e.value)


def test_unreadable_key_file(tmp_path):
    with pytest.raises(ApiKeyError, match="cannot read"):
        load_api_keys(str(tmp_path / "missing.json"), environ={})
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ApiKeyError, match="not UTF-8"):
        load_api_keys(str(tmp_path / "bin.json"), environ={})


def test_keys_are_validated_at_construction():
    with pytest.raises(ApiKeyError):
        ApiKeys({KEY_A: "public"})
    with pytest.raises(ApiKeyError):
        ApiKeys("not a mapping")


@pytest.mark.parametrize("header, reason", [
    (None, "missing API key"), ("", "missing API key"), (f"Basic {KEY_A}", "must be 'Bearer <key>'"),
    ("Bearer", "must be 'Bearer <key>'"), ("Bearer ", "must be 'Bearer <key>'"), (KEY_A, "must be 'Bearer <key>'"),
    (f"Bearer {KEY_A}x", "invalid API key"), (f"Bearer {KEY_A[:-1]}", "invalid API key"),
    (f"Bearer {KEY_A.upper()}", "invalid API key"), ("Bearer sk-\u00e9\u00e9\u00e9", "invalid API key"),
])
def test_wrong_or_missing_keys_get_an_openai_401(header, reason):
    keys = ApiKeys({KEY_A: "a"})
    with pytest.raises(Unauthorized) as e:
        keys.tenant(header)
    assert isinstance(e.value, ApiError) and e.value.status == 401
    reply = e.value.response()
    body = json.loads(reply.body)
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert reason in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key" and KEY_A[4:] not in reply.body.decode()


# ---- public chunks in the payload -----------------------------------------------------

def test_public_chunks_round_trip_through_the_payload():
    items = ["markup", Text("user"), Chunk("private doc"), PublicChunk("public doc")]
    payload = payload_items(items)
    assert payload == ["markup", {"text": "user"}, {"chunk": "private doc"}, {"chunk": "public doc", "public": True}]
    back = prompt_items(payload)
    assert back == items and [type(x) for x in back] == [str, Text, Chunk, PublicChunk]
    assert type(prompt_items([{"chunk": "d", "public": False}])[0]) is Chunk
    for bad in ({"chunk": "d", "public": "yes"}, {"chunk": "d", "public": None}, {"chunk": "d", "other": 1},
                {"text": "t", "public": True}, {"public": True}):
        with pytest.raises(PromptError):
            prompt_items([bad])


class _Tok:
    """Just enough of a tokenizer for render_chat: a fixed chat template."""
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def test_completion_and_chat_take_public_chunks():
    body = {"prompt": "q", "chunks": ["mine", {"chunk": "shared", "public": True}, {"chunk": "also mine"}]}
    req = parse_completion(body, "m", " # # ", None)
    assert req.items == [{"text": ""}, {"chunk": "mine"}, {"chunk": "shared", "public": True},
                         {"chunk": "also mine"}, {"text": "q"}]
    chat = {"messages": [{"role": "user", "content": "q # # inline # # end"}],
            "chunks": [{"chunk": "shared", "public": True}, "mine"]}
    items = parse_chat(chat, "m", " # # ", _Tok(), "P: {chunk}\n").items
    assert [x for x in items if isinstance(x, dict) and "chunk" in x] == [
        {"chunk": "P: shared\n", "public": True}, {"chunk": "P: mine\n"}, {"chunk": "inline"}]


@pytest.mark.parametrize("chunks", [
    [{"chunk": "d", "public": "true"}], [{"chunk": "d", "extra": 1}], [{"public": True}], [{"chunk": 3}],
    [{"chunk": "  ", "public": True}], [{"chunk": "a # # b", "public": True}], "not a list", {"chunk": "d"}, [7]])
def test_malformed_chunk_objects_get_a_400(chunks):
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "q", "chunks": chunks}, "m", " # # ", None)
    assert e.value.status == 400 and e.value.param == "chunks"


# ---- hash isolation, against a brute-force oracle ----------------------------------------

def encode(text: str) -> list[int]:
    return [int(w) for w in text.split()]


DOCS = ["1 2 3 4 5 6", "1 2 3 4 5 6 7", "9"]
TEXTS = ["0 0 0 0 1", "0 0 0 0"]


def prompts():
    """Every prompt of a leading text, one or two of the documents (public or not) and
    a question: the same tokens appear in many prompts, under every flag."""
    for lead, question in itertools.product(TEXTS, ["8 8", "8 8 8 8 8"]):
        for docs in itertools.chain(itertools.permutations(range(len(DOCS)), 1),
                                    itertools.permutations(range(len(DOCS)), 2)):
            for flags in itertools.product([False, True], repeat=len(docs)):
                yield [lead, *((PublicChunk if f else Chunk)(DOCS[d]) for d, f in zip(docs, flags)), question]


def owner(namespace, public: bool):
    """Whose a chunk is: the public namespace's (shared by all) or its tenant's. Without
    tenants (None) everything is one namespace, the public one."""
    return "public" if public or namespace is None else namespace


def all_hashes(namespaces):
    """(hash, what the oracle says it stands for) of every chunk and block of every
    prompt in every namespace."""
    out = []
    for ns in namespaces:
        for prompt in prompts():
            layout = tenant_layout(tokenize_segments(prompt, encode, None), prompt, BS, True, FP, ns)
            spans = [x for x in prompt if isinstance(x, Chunk)]
            for c, item in zip(layout.chunks, spans):
                out.append((c.chunk_hash, ("chunk", owner(ns, isinstance(item, PublicChunk)), c.padded_ids)))
            # A block stands for every token and kind up to its end, in the request's
            # namespace: public chunks inside it do not make the chain public.
            for b, h in enumerate(layout.block_hashes):
                if h is not None:
                    out.append((h, ("block", owner(ns, False), tuple(layout.token_ids[:(b + 1) * BS]),
                                    tuple(layout.block_kinds[:b + 1]))))
    return out


def test_hashes_are_equal_exactly_when_the_oracle_says_the_kv_is_the_same():
    """Over every chunk and block of every prompt, for no tenants and two tenants: two
    hashes are equal if and only if they stand for the same tokens in the same
    namespace. So a tenant's chunk or prefix block never matches another tenant's,
    and a public chunk is one chunk for everyone."""
    seen: dict = {}
    for h, meaning in all_hashes([None, "team-a", "team-b"]):
        seen.setdefault(meaning, set()).add(h)
    assert all(len(hs) == 1 for hs in seen.values())            # same meaning, same hash
    by_hash: dict = {}
    for meaning, hs in seen.items():
        by_hash.setdefault(hs.pop(), []).append(meaning)
    assert all(len(m) == 1 for m in by_hash.values()), [m for m in by_hash.values() if len(m) > 1][:3]
    assert any(m[0][1] == "public" and m[0][0] == "chunk" for m in by_hash.values())  # the oracle had public ones


def test_no_tenants_is_todays_layout_and_public_chunks_hash_as_without_tenants():
    for prompt in itertools.islice(prompts(), 0, None, 7):
        segs = tokenize_segments(prompt, encode, None)
        plain = build_layout(segs, BS, True, FP)
        assert tenant_layout(segs, prompt, BS, True, FP, None) == plain
        tenant = tenant_layout(segs, prompt, BS, True, FP, "team-a")
        for c, t, item in zip(plain.chunks, tenant.chunks, [x for x in prompt if isinstance(x, Chunk)]):
            assert (c.chunk_hash == t.chunk_hash) == isinstance(item, PublicChunk)
            assert c.chunk_hash == chunk_hash(FP, encode(item.text), BS)
        assert not set(plain.block_hashes) - {None} & set(tenant.block_hashes)


def test_the_router_gets_the_engines_namespaced_hashes():
    """What the ingress hashes for the router is what the engine's layout holds, in
    each namespace: chunk hashes, and the leading prompt-text blocks."""
    for ns in (None, "team-a", "team-b"):
        for prompt in itertools.islice(prompts(), 0, None, 5):
            layout = tenant_layout(tokenize_segments(prompt, encode, None), prompt, BS, True, FP, ns)
            info = build_routing(payload_items(prompt), encode, FP, BS, namespace=ns)
            assert info.chunk_hashes == tuple(c.chunk_hash for c in layout.chunks)
            lead = len(encode(prompt[0])) // BS
            assert info.prefix == tuple(layout.block_hashes[:lead])
            assert all(k == KIND_PROMPT for k in layout.block_kinds[:lead])


class _Router:
    """The real chunk router with given queue lengths (no Serve controller)."""
    @staticmethod
    def make():
        from ray.serve._private.common import DeploymentHandleSource, DeploymentID
        from router.chunk_router import ChunkAffinityRouter

        class R(ChunkAffinityRouter):
            async def _probe_queue_lens(self, replicas, backoff_index):
                return [(r, 0) for r in replicas]
        r = R(DeploymentID(name="EngineServer", app_name="t"), DeploymentHandleSource.UNKNOWN)
        r.initialize_state()
        return r


def test_the_router_never_sends_a_tenant_to_another_tenants_chunks():
    """Replica "a" holds team-a's copy of a document (as its routing stats report it),
    "pub" holds the public copy. team-b asking for the same document privately finds
    no replica with it (no affinity: what it is routed by says nothing of team-a); as
    public it goes to "pub"; team-a goes to "a"."""
    doc = DOCS[1]
    held = {ns: build_routing([{"chunk": doc}], encode, FP, BS, namespace=ns).chunk_hashes[0]
            for ns in ("team-a", "team-b", None)}
    assert len(set(held.values())) == 3

    def route(items, ns):
        router = _Router.make()
        replicas = [SimpleNamespace(replica_id=n, routing_stats={"chunks": [h], "stored": [], "free_blocks": 1})
                    for n, h in (("a", held["team-a"]), ("pub", held[None]))]
        pending = SimpleNamespace(args=[{PAYLOAD_KEY: build_routing(items, encode, FP, BS, namespace=ns)}], kwargs={})
        first = asyncio.run(router._choose(replicas, pending))[0][0].replica_id
        return router.last_decision, first
    question = "8 8"
    assert route(["0", {"chunk": doc}, question], "team-b")[0] == "no_match"
    assert route(["0", {"chunk": doc, "public": True}, question], "team-b") == ("affinity", "pub")
    assert route(["0", {"chunk": doc}, question], "team-a") == ("affinity", "a")
    assert route(["0", {"chunk": doc}, question], None) == ("affinity", "pub")   # no tenants: today's hashes
