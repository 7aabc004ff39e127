"""The GPU kernel benchmark runs end to end (tiny sizes, CPU, TRITON_INTERPRET=1), and
every variant it times agrees with torch's scaled_dot_product_attention."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_benchmark_smoke_run_checks_every_variant(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-m", "bench.kernels_gpu", "--smoke", "--out", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    rows = json.load(open(tmp_path / "kernels_gpu.json"))["rows"]
    assert {(r["mode"], r["d"]) for r in rows} == {("decode", 64), ("prefill", 64), ("decode", 128), ("prefill", 128)}
    for r in rows:
        prefill = r["mode"] == "prefill"
        want = {"table", "trig", "table16", "runs", "runs16"} | ({"once", "packed", "packed_runs"} if prefill else set())
        assert set(r["rel_err"]) == want == set(r["t_s"])
        assert set(r["t_nope_s"]) == ({"plain", "packed"} if prefill else {"plain"})
        # bf16 K/V: errors relative to the largest output element.
        assert max(r["rel_err"].values()) < 5e-2, r["rel_err"]
    table = (tmp_path / "kernels_gpu.md").read_text()
    assert table.count("\n| decode |") == 2 and table.count("\n| prefill |") == 2


def test_kernel_sweeps_smoke_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for which, n_rows in (("decode", 2 * 3), ("prefill", 6)):
        subprocess.run([sys.executable, "-m", "bench.kernels_gpu", "--smoke", "--sweep", which, "--out", str(tmp_path)],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
        rows = json.load(open(tmp_path / f"kernels_gpu_sweep_{which}.json"))["rows"]
        assert len(rows) == n_rows and all(r["t_s"] > 0 for r in rows), rows
        assert (tmp_path / f"kernels_gpu_sweep_{which}.md").read_text().count("\n| ") == n_rows + 1
