"""The routing contract between ingress and router (``mepic_ray.routing``): its
validation, its trip through Ray pickling, what ``build_routing`` hashes, and that
reading it from a request never raises."""
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mepic_ray.hashing import KIND_PROMPT, block_hash, chunk_hash
from mepic_ray.routing import EMPTY, PAYLOAD_KEY, RoutingInfo, build_routing, routing_of

FP = "contract-model"


def encode(text: str) -> list[int]:
    return [int(w) for w in text.split()]


def test_routing_info_normalizes_and_validates():
    info = RoutingInfo(chunks=[["a", 3], ("b", 0)], prefix=["p0", "p1"], block_size=4)
    assert info.chunks == (("a", 3), ("b", 0)) and info.prefix == ("p0", "p1")
    assert info.chunk_hashes == ("a", "b")
    assert hash(info) == hash(RoutingInfo((("a", 3), ("b", 0)), ("p0", "p1"), 4))   # frozen, hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.block_size = 8
    assert EMPTY == RoutingInfo() and EMPTY.chunks == () and EMPTY.prefix == () and EMPTY.block_size == 0
    for bad in (dict(chunks=[("a", -1)]), dict(prefix=["p"], block_size=0), dict(block_size=-4)):
        with pytest.raises(ValueError):
            RoutingInfo(**bad)
    for bad in (dict(chunks=[("a", "3")]), dict(chunks=[("a", True)]), dict(chunks=[("a", 3.0)]),
                dict(chunks=[(7, 3)]), dict(chunks=[("", 3)]), dict(chunks=[("a", 3, 4)]), dict(chunks=["ab"]),
                dict(chunks="ab"), dict(chunks=None), dict(prefix="p"), dict(prefix=[1], block_size=4),
                dict(block_size=4.0), dict(block_size=None)):
        with pytest.raises(TypeError):
            RoutingInfo(**bad)


def test_routing_info_survives_ray_pickling():
    from ray import cloudpickle
    info = build_routing(["1 2 3 4 5", {"chunk": "6 7"}], encode, FP, 2)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps({"prompt": [], PAYLOAD_KEY: info}))[PAYLOAD_KEY]
        assert back == info and type(back) is RoutingInfo


def test_build_routing_hashes_chunks_and_the_leading_full_blocks():
    items = ["1 2 3", "4 5", {"chunk": "7 8 9"}, "1 2", {"chunk": "6"}, "3 3 3 3"]
    info = build_routing(items, encode, FP, 2)
    assert info.block_size == 2
    assert info.chunks == ((chunk_hash(FP, [7, 8, 9], 2), 3), (chunk_hash(FP, [6], 2), 1))
    # Text items before the first chunk are concatenated; the last, partial block and
    # all text after the first chunk are not part of the prefix.
    b0 = block_hash(FP, KIND_PROMPT, [1, 2])
    assert info.prefix == (b0, block_hash(b0, KIND_PROMPT, [3, 4]))
    assert build_routing(["1 2 3 4 5"], encode, FP, 2) == RoutingInfo((), info.prefix, 2)
    assert build_routing([{"chunk": "1 2 3 4"}, "5 6"], encode, FP, 2).prefix == ()
    assert build_routing(["1"], encode, FP, 2) == RoutingInfo(block_size=2)
    assert build_routing(["1 2"], encode, "other-model", 2).prefix != build_routing(["1 2"], encode, FP, 2).prefix
    with pytest.raises(ValueError):
        build_routing(["1 2"], encode, FP, 0)
    with pytest.raises(TypeError):
        build_routing([3], encode, FP, 2)


def test_chunk_hashes_are_the_engines():
    """The router compares these with what replicas report as resident: the engine's
    own chunk hashes from its prompt layout."""
    from mepic_ray.core.layout import build_layout
    from mepic_ray.segments import Chunk, tokenize_segments
    items = ["0 1 2", {"chunk": "5 6 7 8 9"}, "3", {"chunk": "4 4"}, "1 1"]
    engine_items = [Chunk(x["chunk"]) if isinstance(x, dict) else x for x in items]
    layout = build_layout(tokenize_segments(engine_items, encode, None), 4, True, FP)
    assert build_routing(items, encode, FP, 4).chunk_hashes == tuple(c.chunk_hash for c in layout.chunks)


def test_routing_of_never_raises():
    info = RoutingInfo((("a", 1),))
    assert routing_of(SimpleNamespace(args=[{PAYLOAD_KEY: info}], kwargs={})) is info

    class Hostile:
        @property
        def args(self):
            raise RuntimeError("no")

    class BadMapping(dict):
        def get(self, *a):
            raise KeyError("no")

    for pending in (None, object(), Hostile(), SimpleNamespace(args=None), SimpleNamespace(args=[]),
                    SimpleNamespace(args=["text"]), SimpleNamespace(args=[{}]), SimpleNamespace(args=[BadMapping()]),
                    SimpleNamespace(args=[{PAYLOAD_KEY: {"chunks": [["a", 1]]}}]),    # the old untyped dict
                    SimpleNamespace(args=[{PAYLOAD_KEY: None}])):
        assert routing_of(pending) is EMPTY


def test_contract_imports_neither_torch_nor_the_engine():
    """Beyond what the lazy, torch-free package loads, the contract adds only itself
    and ``mepic_ray.hashing`` (no Ray either: the ingress and router bring that)."""
    code = ("import sys, mepic_ray; pkg = set(sys.modules); "
            "import mepic_ray.routing as r; r.build_routing(['1 2'], lambda t: [1, 2], 'm', 2); "
            "new = sorted(set(sys.modules) - pkg - {'mepic_ray.routing', 'mepic_ray.hashing', 'xxhash'}); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m.startswith(('mepic_ray.engine', 'mepic_ray.worker', 'mepic_ray.tier', 'mepic_ray.kernels'))); "
            "assert not [m for m in new if m.startswith(('mepic_ray', 'ray'))], new; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
