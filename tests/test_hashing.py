"""Hashes must be identical on every host: explicit little-endian int64 token bytes."""
from __future__ import annotations

import array as _array
import subprocess
import sys

import pytest

import mepic_ray.hashing as hashing
from mepic_ray.hashing import KIND_CHUNK_SHARED, KIND_PROMPT, PAD_TOKEN, block_hash, chunk_hash, pad_front

REAL_BYTEORDER = sys.byteorder  # before any fixture pretends otherwise
TOKENS = [5, 6, 7, PAD_TOKEN, 0, 151, 49151, 2**40, -2**63, 2**63 - 1]


def reference_bytes(token_ids) -> bytes:
    """Independent spec: each id as 8 little-endian two's-complement bytes."""
    return b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids)


class _BigEndianArray(_array.array):
    """array.array as a big-endian host would produce it: native order is big."""

    def tobytes(self):
        swapped = _array.array(self.typecode, self)
        if REAL_BYTEORDER == "little":
            swapped.byteswap()
        return swapped.tobytes()


@pytest.fixture(params=["native", "big-endian"])
def host(request, monkeypatch):
    """Run a test on this host and on a simulated big-endian one.

    Anything in hashing that encodes ints in the machine's native order sees
    swapped bytes under "big-endian", exactly as it would on such a machine.
    """
    if request.param == "big-endian":
        monkeypatch.setattr(hashing, "array", _BigEndianArray, raising=False)
        monkeypatch.setattr(sys, "byteorder", "big")
    return request.param


def test_token_bytes_are_little_endian_int64(host):
    assert hashing._token_bytes(TOKENS) == reference_bytes(TOKENS)
    assert hashing._token_bytes(tuple(TOKENS)) == reference_bytes(TOKENS)
    assert hashing._token_bytes(iter(TOKENS)) == reference_bytes(TOKENS)
    assert hashing._token_bytes([]) == b""
    padded = pad_front([1, 2, 3], 16)
    assert hashing._token_bytes(padded) == reference_bytes(padded)
    assert hashing._token_bytes([PAD_TOKEN]) == b"\xff" * 8


def test_hash_values_are_pinned(host):
    """Values from the little-endian release: caches and the object-store tier keep them."""
    assert chunk_hash("fp", [5, 6, 7, -1, 2**40, -2**63, 2**63 - 1], 16) == "52634e4c75f7934715d7b0e94a419393"
    assert block_hash(None, KIND_PROMPT, list(range(-1, 15))) == "4045298660eb74f54145fc1a6247f275"
    assert block_hash("abc", KIND_CHUNK_SHARED, [151, 0, -1]) == "47747f81b24a634828f6dbd7bacf6ff4"


@pytest.mark.skipif(sys.byteorder != "little", reason="array('q') is the old encoding only on little-endian")
def test_same_bytes_as_old_encoding_on_little_endian():
    ids = list(range(-1, 4095))
    assert hashing._token_bytes(ids) == _array.array("q", ids).tobytes()


def test_out_of_range_and_non_integer_ids_are_rejected():
    with pytest.raises(OverflowError):
        hashing._token_bytes([2**63])
    with pytest.raises(OverflowError):
        hashing._token_bytes([-2**63 - 1])
    with pytest.raises(TypeError):
        hashing._token_bytes([1, "2"])


def test_chunk_hash_equal_across_fresh_processes():
    # PYTHONHASHSEED differs per process, so a salted hash() would differ here.
    code = ("from mepic_ray.hashing import chunk_hash, pad_front; "
            "print(chunk_hash('fp', [5, 6, 7, -1, 2**40], 16), pad_front([5, 6, 7], 16).count(-1))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           timeout=60).stdout for _ in range(2)]
    assert outs[0] == outs[1]
    assert outs[0].split() == [chunk_hash("fp", [5, 6, 7, -1, 2**40], 16), "13"]


def test_import_does_not_pull_torch():
    code = ("import sys, mepic_ray.hashing as h; h.chunk_hash('m', [1, 2], 16); "
            "h.block_hash(None, 1, [1, 2]); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
