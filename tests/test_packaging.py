"""The installed package resolves to this tree from any working directory, even where
another distribution owns a generic top-level name (transformers 5 installs one called
``kernels``): the engine's own modules live under ``mepic_ray``."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_engine_imports_outside_the_repository(tmp_path):
    code = ("import mepic_ray.engine, mepic_ray.kernels as k, mepic_ray.worker.attention as a; "
            "print(k.__file__); print(a.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for path in out.stdout.split():
        assert Path(path).resolve().is_relative_to(ROOT), path


def test_the_kernels_need_only_torch_and_triton(tmp_path):
    code = ("import sys, mepic_ray; pkg = set(sys.modules); import mepic_ray.kernels, mepic_ray.kernels.cascade; "
            "bad = sorted(m for m in set(sys.modules) - pkg if m.startswith('mepic_ray.') "
            "and not m.startswith('mepic_ray.kernels') or m.split('.')[0] in ('transformers', 'ray')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
