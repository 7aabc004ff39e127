"""The document registry and the tier's pins, without Ray or a model: registrations
commit whole or not at all, pins hold under their budget and lapse with their TTL,
ids are scoped per tenant, and registration bodies are refused with a reason.

References: a list-based LRU that skips pinned entries (for the directory), and
sums over the documents recomputed from scratch (for pinned bytes)."""
import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from deployments.documents import MAX_DOCUMENTS, parse_registration
from deployments.protocol import ApiError
from mepic_ray.hashing import PUBLIC_NAMESPACE
from mepic_ray.tier.chunk_store import ChunkDirectory
from mepic_ray.tier.documents import DocumentError, DocumentRegistry, NewDocument


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def doc(doc_id, text="some text", public=False, pin=False, ttl=None, h=None, nbytes=100, forms=None):
    h = h or f"h-{text}"
    return NewDocument(doc_id, public, text, len(text), forms or {"completions": h}, {h: nbytes}, {}, pin, ttl)


# -- the directory: LRU under a byte budget, pinned entries never evicted --------------
ops = st.lists(st.tuples(st.sampled_from(["put", "pin", "unpin", "tick", "lookup"]),
                         st.integers(0, 9), st.integers(1, 40)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_directory_evicts_the_oldest_unpinned_like_a_list_lru(ops):
    clock = Clock()
    d = ChunkDirectory(100, clock=clock)
    model: list[tuple[str, int]] = []     # oldest first
    pins: dict[str, float] = {}
    for op, k, n in ops:
        h = f"c{k}"
        if op == "put":
            ok = d.put({"hash": h, "nbytes": n}, lambda: object())
            if any(x == h for x, _ in model):
                model = [e for e in model if e[0] != h] + [e for e in model if e[0] == h]
                assert ok
                continue
            kept, used = list(model), sum(b for _, b in model)
            for x, b in list(kept):
                if used + n <= 100:
                    break
                if pins.get(x, 0) <= clock.now:
                    kept.remove((x, b))
                    used -= b
            expect = used + n <= 100
            assert ok == expect
            if expect:
                model = kept + [(h, n)]
        elif op == "pin":
            pins[h] = clock.now + n
        elif op == "unpin":
            pins.pop(h, None)
        elif op == "tick":
            clock.now += n / 4
        else:
            found = d.lookup([h])
            if any(x == h for x, _ in model):
                assert h in found
                model = [e for e in model if e[0] != h] + [e for e in model if e[0] == h]
        d.pins = dict(pins)
        assert list(d.entries) == [x for x, _ in model]
        assert d.bytes_used == sum(b for _, b in model) <= 100


# -- the registry --------------------------------------------------------------------
def test_a_registration_over_the_pin_budget_registers_nothing_and_names_the_budget():
    reg = DocumentRegistry(pin_budget_bytes=250, clock=Clock())
    reg.commit("a", [doc("one", "t1", pin=True), doc("two", "t2", pin=True)], warm=False)
    before = (dict(reg.docs), reg.pinned_bytes())
    with pytest.raises(DocumentError) as e:
        reg.commit("a", [doc("three", "t3"), doc("four", "t4", pin=True)], warm=True)
    assert e.value.status == 409 and "250 bytes" in e.value.message and "pin_budget_bytes" in e.value.message
    assert (dict(reg.docs), reg.pinned_bytes()) == before and reg.warm_since(0) == ([], 0)
    reg.commit("a", [doc("three", "t3"), doc("four", "t4")], warm=False)   # unpinned: no budget
    assert {i for _, i in reg.docs} == {"one", "two", "three", "four"}


def test_pins_lapse_with_their_ttl_and_count_each_chunk_once():
    clock = Clock()
    reg = DocumentRegistry(pin_budget_bytes=10_000, clock=clock)
    reg.commit("a", [doc("x", "same", pin=True, ttl=10, nbytes=300), doc("forever", "f", pin=True, nbytes=50)], False)
    reg.commit("b", [doc("y", "same", pin=True, ttl=20, nbytes=300)], False)   # the same chunk, another pin
    assert reg.pins() == {"h-same": 1020.0, "h-f": math.inf}
    assert reg.pinned_bytes() == 350
    clock.now += 15
    assert reg.pinned_bytes() == 350 and reg.pins()["h-same"] == 1020.0
    clock.now += 10
    assert reg.pins() == {"h-f": math.inf} and reg.pinned_bytes() == 50
    view = reg.find("a", "x").public_view(clock.now, {"h-same"})
    assert view["pinned"] is False and view["stored"] is True and view["pin_expires_at"] is None


def test_ids_are_scoped_per_tenant_and_public_ones_are_read_by_all():
    reg = DocumentRegistry(10_000, clock=Clock())
    reg.commit("a", [doc("faq", "A's faq"), doc("hand", "handbook", public=True)], False)
    reg.commit("b", [doc("faq", "B's faq")], False)     # the same id in another scope
    assert reg.find("a", "faq").text == "A's faq" and reg.find("b", "faq").text == "B's faq"
    assert reg.find("b", "hand").scope == PUBLIC_NAMESPACE
    with pytest.raises(DocumentError) as e:
        reg.find("c", "faq")
    assert e.value.status == 404
    assert sorted(d.id for d in reg.visible("b")) == ["faq", "hand"]
    with pytest.raises(DocumentError) as e:
        reg.delete("b", "hand")      # public, but A's
    assert e.value.status == 403
    assert reg.delete("a", "hand") == {"h-handbook"}
    assert [d.id for d in reg.visible("b")] == ["faq"]


def test_an_id_keeps_its_text_and_a_same_text_registration_is_idempotent():
    clock = Clock()
    reg = DocumentRegistry(10_000, clock=clock)
    first = reg.commit("a", [doc("d", "text one")], False)
    assert first[0]["status"] == "registered"
    clock.now += 5
    again = reg.commit("a", [doc("d", "text one", pin=True)], False)
    assert again[0]["status"] == "exists" and again[0]["pinned"] and again[0]["created"] == first[0]["created"]
    with pytest.raises(DocumentError) as e:
        reg.commit("a", [doc("new", "other"), doc("d", "text two")], False)
    assert e.value.status == 409 and "other text" in e.value.message
    assert {i for _, i in reg.docs} == {"d"}
    with pytest.raises(DocumentError):
        reg.commit("a", [doc("z", "t"), doc("z", "t")], False)


def test_delete_returns_only_chunks_no_other_document_holds():
    reg = DocumentRegistry(10_000, clock=Clock())
    reg.commit("a", [doc("one", "shared text"), doc("two", "shared text"), doc("three", "own")], False)
    assert reg.delete("a", "one") == set()           # "two" holds the same chunk
    assert reg.delete("a", "two") == {"h-shared text"}
    assert reg.nbytes == {"h-own": 100}


def test_warm_announcements_reach_pollers_once():
    reg = DocumentRegistry(10_000, clock=Clock())
    reg.commit("a", [doc("w", "warm me", forms={"completions": "h1", "chat": "h2"})], warm=True)
    hashes, cursor = reg.warm_since(0)
    assert hashes == ["h1", "h2"]
    assert reg.warm_since(cursor) == ([], cursor)
    reg.report_warm("replica-1", {"h2"})
    assert reg.find("a", "w").public_view(0, set())["warm_replicas"] == 1


# -- registration bodies ------------------------------------------------------------
def parse(body) -> object:
    return parse_registration(json.dumps(body).encode(), "<|sep|>", "Passage: {chunk}\n", 10_000)


@pytest.mark.parametrize("body, reason", [
    ({"documents": []}, "non-empty list"),
    ({"documents": [{"text": ""}]}, "'text' must be a non-empty string"),
    ({"documents": [{"text": "   "}]}, "'text' must be a non-empty string"),
    ({"documents": [{"text": "x" * 10_001}]}, "cannot fit"),
    ({"documents": [{"text": "a<|sep|>b"}]}, "separator"),
    ({"documents": [{"text": "t", "id": "../etc"}]}, "'id' must match"),
    ({"documents": [{"text": "t", "id": ""}]}, "'id' must match"),
    ({"documents": [{"text": "t", "ttl_s": 5}]}, "needs 'pin': true"),
    ({"documents": [{"text": "t", "pin": True, "ttl_s": -1}]}, "positive number"),
    ({"documents": [{"text": "t", "metadata": {"k": "v" * 5000}}]}, "4096 bytes"),
    ({"documents": [{"text": "t", "metadata": [1]}]}, "JSON object"),
    ({"documents": [{"text": "t", "routes": ["fax"]}]}, "'routes'"),
    ({"documents": [{"text": "t", "colour": "red"}]}, "optional 'id'"),
    ({"documents": [{"text": "t"}], "warm": "yes"}, "'warm' must be a boolean"),
    ({"documents": [{"text": "t"}] * (MAX_DOCUMENTS + 1)}, f"at most {MAX_DOCUMENTS}"),
    ({"docs": []}, "the body must be"),
])
def test_bad_registrations_are_refused_with_a_reason(body, reason):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == 400 and reason in e.value.message


def test_a_registration_gives_each_route_its_chunk_form():
    reg = parse({"documents": [{"text": "doc", "id": "d1", "pin": True, "ttl_s": 60},
                               {"text": "other", "routes": ["chat"]}], "warm": True})
    assert reg.warm and reg.documents[0]["forms"] == {"completions": "doc", "chat": "Passage: doc\n"}
    assert reg.documents[0]["ttl_s"] == 60.0 and reg.documents[1]["forms"] == {"chat": "Passage: other\n"}
    assert reg.documents[1]["id"].startswith("doc-")    # a default id, from the text


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["documents", "warm", "text", "id", "pin", "ttl_s", "metadata",
                                                "routes", "public", "x"]), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(body=json_values)
def test_any_json_body_is_parsed_or_refused_with_an_api_error(body):
    try:
        reg = parse(body)
    except ApiError as e:
        assert e.status == 400 and e.message
        return
    assert all(d["text"].strip() and d["forms"] for d in reg.documents)
