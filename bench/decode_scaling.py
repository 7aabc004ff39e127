"""Decode steps with many sequences reading the same chunks: 1, 4, 16 and 32 sequences,
each holding the same 16 SQuAD passages in its own order (so at other positions),
``mepic``, every chunk page resident. Reports the mean decode step, its ratio to the
1-sequence step, and the KV bytes a step reads when each sequence reads all its pages
against the unique pages in the batch (what cascade attention reads).

    python -m bench.decode_scaling --out bench/results/decode_scaling

Uses only APIs older versions have too, so the same file measures before and after
(run it from the other version's tree with ``--label``; ``--merge`` tabulates runs).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench.squad import SYSTEM, load_paragraphs
from mepic_ray import LLM, Chunk, SamplingParams


def prompts(n: int, passages: list[str], seed: int) -> list[list]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        order = passages[:]
        rng.shuffle(order)
        out.append([SYSTEM, *(Chunk(f"Passage: {p}\n") for p in order),
                    f"Question {i}: what is this about?<|im_end|>\n<|im_start|>assistant\n"])
    return out


def measure(llm: LLM, batch: list[list], steps: int) -> dict:
    eng = llm.engine
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in batch]
    counts = dict.fromkeys(ids, 0)
    for _ in range(10_000):               # prefill until every sequence decodes
        for o in eng.step():
            counts[o.request_id] = len(o.token_ids)
        if min(counts.values()) >= 2:
            break
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = eng.step()
        times.append(time.perf_counter() - t0)
        assert len(outs) == len(batch), "every sequence decodes in every timed step"
    tables = [eng.kv.block_table(r) for r in eng.scheduler.running]
    per_seq = sum(len(t) for t in tables)
    unique = len({b for t in tables for b in t})
    while eng.has_unfinished():
        eng.step()
    return {"step_s": statistics.mean(times), "step_p50_s": statistics.median(times),
            "pages_read_per_seq_sum": per_seq, "unique_pages": unique,
            "kv_bytes_per_seq_sum": per_seq * eng.bytes_per_block, "kv_bytes_unique": unique * eng.bytes_per_block}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per batch")
    ap.add_argument("--label", default="run")
    ap.add_argument("--merge", nargs="+", default=None, help="JSON files of earlier runs to tabulate together")
    ap.add_argument("--out", default="bench/results/decode_scaling")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
    else:
        paras = [p.context for p in load_paragraphs(700)[:args.passages]]
        llm = LLM(args.model, mode="mepic", kv_cache_bytes=4 * 2**30, max_num_seqs=64)
        llm.generate(prompts(1, paras, 99), SamplingParams(max_tokens=1, temperature=0))   # chunks resident
        sizes = [int(x) for x in args.batches.split(",")]
        result = {"label": args.label, "passages": args.passages, "batches": {}}
        for n in tqdm(sizes, desc="batches"):
            result["batches"][str(n)] = measure(llm, prompts(n, paras, n), args.steps)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1))
        runs = [result]
    lines = ["| label | sequences | step | × 1-sequence step | KV pages read, each sequence all its own | "
             "unique pages in the batch |", "|---|---|---|---|---|---|"]
    for r in runs:
        one = r["batches"]["1"]["step_s"]
        for n, m in r["batches"].items():
            lines.append(f"| {r['label']} | {n} | {m['step_s'] * 1000:.0f} ms | {m['step_s'] / one:.1f}× | "
                         f"{m['pages_read_per_seq_sum']} ({m['kv_bytes_per_seq_sum'] / 2**20:.0f} MiB) | "
                         f"{m['unique_pages']} ({m['kv_bytes_unique'] / 2**20:.0f} MiB) |")
    text = "\n".join(lines)
    out.with_name(out.name + ".md").write_text(text + "\n")
    print(text)
    return runs[-1]


if __name__ == "__main__":
    main()
