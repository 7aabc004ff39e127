"""On CPU the engine has glibc serve large temporaries from its heap (kept for the next
step) rather than a fresh mmap each: checked with glibc's own accounting (mallinfo2's
bytes in mmapped blocks) in a fresh process around a 64 MiB tensor."""
import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from mepic_ray.config import EngineConfig

PROBE = """
import ctypes, sys, torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
keep = int(sys.argv[2])
if sys.argv[1] != "-":
    from mepic_ray.config import EngineConfig
    from mepic_ray.engine import LLMEngine
    LLMEngine(EngineConfig(model=sys.argv[1], mode="full", num_blocks=16, host_heap_keep_bytes=keep))
before = libc.mallinfo2().hblkhd
x = torch.ones(16 * 2**20)              # 64 MiB, touched
print(libc.mallinfo2().hblkhd - before)
"""


def _mapped_bytes(model: str, keep: int) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, model, str(keep)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt and mallinfo2")
def test_large_temporaries_come_from_the_heap_once_an_engine_runs(tiny_model_dir):
    assert _mapped_bytes("-", 0) >= 64 * 2**20          # glibc's default: mapped afresh
    assert _mapped_bytes(str(tiny_model_dir), 0) >= 64 * 2**20       # 0 leaves it so
    assert _mapped_bytes(str(tiny_model_dir), 2**30) == 0


@pytest.mark.parametrize("bad", [-1, 2**31, True, 1.5])
def test_host_heap_keep_bytes_is_validated(bad):
    with pytest.raises(ValueError, match="host_heap_keep_bytes"):
        EngineConfig(host_heap_keep_bytes=bad)
