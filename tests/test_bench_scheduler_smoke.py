"""bench.scheduler runs both parts end to end on a tiny random model and a tiny synthetic
trace (no SQuAD download), and its merge mode compares two labelled runs."""
import json

import pytest

import bench.squad
from bench import scheduler


@pytest.fixture
def tiny_squad(monkeypatch):
    paras = [bench.squad.Paragraph(f"Paragraph {i} says the answer is {i * 7}.",
                                   [(f"What is {i} ({k})?", [str(i * 7)]) for k in range(3)]) for i in range(12)]
    monkeypatch.setattr(bench.squad, "load_paragraphs", lambda max_chars: list(paras))


def run(tmp_path, model, label):
    out = tmp_path / label
    result = scheduler.main(["--part", "both", "--model", model, "--modes", "full,mepic", "--chunks", "2",
                             "--pool", "4", "--reuse", "1.0", "--qps", "200", "--requests", "3",
                             "--max-tokens", "5", "--fixed-length",
                             "--kv-bytes", str(2**22), "--batch-tokens", "2048", "--max-seqs", "4",
                             "--capacity-blocks", "200", "--capacity-requests", "4", "--capacity-seqs", "8",
                             "--stop-after", "4", "--time-limit", "60", "--label", label, "--out", str(out)])
    return out, result


def test_scheduler_bench_both_parts_and_merge(tmp_path, tiny_model_dir, tiny_squad, one_thread):
    out_a, res = run(tmp_path, tiny_model_dir, "before")
    saved = json.loads(out_a.with_suffix(".json").read_text())
    assert saved["label"] == "before" and set(saved["itl"]["modes"]) == {"full", "mepic"}
    assert tiny_model_dir not in saved["command"] and str(tmp_path) not in saved["command"]
    for mode, m in saved["itl"]["modes"].items():
        assert m["finished"] == 3 and not m["timed_out"], mode
        # --fixed-length: 5 tokens each, so 4 gaps per request
        assert len(m["itl_s"]) == 3 * 4 and all(g >= 0 for g in m["itl_s"])
        assert m["itl_p50_s"] <= m["itl_p99_s"] <= m["itl_max_s"]
        assert m["step_p50_s"] <= m["step_max_s"] and m["running_max"] >= 1
        assert m["peak_blocks"] >= 1 and m["dedup_limit_blocks"] >= 1
        assert m["peak_over_limit"] == pytest.approx(m["peak_blocks"] / m["dedup_limit_blocks"])
        assert len(m["step_log"]["rows"]) == m["steps"]
    # Full computes every request's pages privately; the ideal limit shares at least the instruction.
    full = saved["itl"]["modes"]["full"]
    assert full["peak_blocks"] >= full["dedup_limit_blocks"]
    for mode, m in saved["capacity"]["modes"].items():
        assert m["done"] == 4 and not m["timed_out"], mode
        # A 200-page pool holds all four small requests: submitted together, they all run at
        # once, and overlap for most of the run.
        assert m["running_max"] == 4 and m["running_mean"] > 2
        assert m["tokens_per_request"] == 4          # aborted by the driver at --stop-after
    assert saved["itl"]["workload"]["requests"] == 3
    md = out_a.with_suffix(".md").read_text()
    assert "| mepic | before |" in md and "Dedup limit" in md and (tmp_path / "before_itl_cdf.png").stat().st_size

    out_b, _ = run(tmp_path, tiny_model_dir, "after")
    merged = scheduler.main(["--merge", str(out_a.with_suffix(".json")), str(out_b.with_suffix(".json")),
                             "--out", str(tmp_path / "cmp")])
    assert merged["labels"] == ["before", "after"]
    md = (tmp_path / "cmp.md").read_text()
    assert "| full | before |" in md and "| full | after |" in md and "| mepic | after/before |" in md
    assert str(tmp_path) not in md and (tmp_path / "cmp_itl_cdf.png").stat().st_size > 0
