"""Service times for the fleet simulator, measured on this machine's engine.

    python -m bench.fleet_calibrate --out bench/results/fleet_calibration.json

Prefill: one request at a time in ``full`` mode (nothing reused, so every prompt
token is computed), ``max_tokens=1``, several prompt lengths, on one torch thread,
timed in this process's CPU seconds (the machine is shared, and wall time there
measures the neighbours too), the fastest of a few runs each; fitted as ``a + b * tokens + c * tokens**2`` (the square is attention).
Decode: in the same process and unit, one decode step of 1 to 32 sequences of about
``--decode-context`` prompt tokens each, fitted as ``d0 + d1 * sequences``.
(``bench/results/decode_scaling_after.json`` has wall-clock steps on two threads, for
comparison.)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm



def fit_prefill(points: list[tuple[int, float]]) -> dict:
    n = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n, n * n], 1), t, rcond=None)
    a, b, c = (max(0.0, float(x)) for x in coef)   # a negative term would make short prefills free
    return {"a_s": a, "b_s_per_token": b, "c_s_per_token2": c}


def fit_decode(points: list[tuple[int, float]]) -> dict:
    d1, d0 = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return {"d0_s": max(0.0, float(d0)), "d1_s_per_seq": max(0.0, float(d1))}


def _text(tok, words: list[str], rng: random.Random, n: int) -> str:
    return tok.decode([tok.convert_tokens_to_ids(rng.choice(words)) for _ in range(n)])


def measure(lengths: list[int], batches: list[int], context: int, repeats: int, seed: int):
    import torch
    from mepic_ray import LLM, SamplingParams
    torch.set_num_threads(1)
    llm = LLM(None, mode="full", max_num_seqs=max(batches))
    tok = llm.engine.tokenizer
    words = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 3][:5000]
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(["warm up " * 8], params)
    prefill = []
    for n in tqdm(lengths, desc="prefill lengths"):
        times, sizes = [], []
        for _ in range(repeats):
            text = _text(tok, words, rng, n)
            sizes.append(len(tok.encode(text, add_special_tokens=False)))
            t0 = time.process_time()
            llm.generate([text], params)
            times.append(time.process_time() - t0)
        prefill.append((int(statistics.median(sizes)), min(times)))
    decode, eng = [], llm.engine
    steps = SamplingParams(max_tokens=repeats + 3, temperature=0, ignore_eos=True)
    for b in tqdm(batches, desc="decode batches"):
        ids = [eng.add_request(_text(tok, words, rng, context), steps) for _ in range(b)]
        counts = dict.fromkeys(ids, 0)
        while min(counts.values()) < 2:          # prefill until every sequence decodes
            for o in eng.step():
                counts[o.request_id] = len(o.token_ids)
        timed = []
        for _ in range(repeats):
            t0 = time.process_time()
            outs = eng.step()
            timed.append((time.process_time() - t0, len(outs)))
        while eng.has_unfinished():
            eng.step()
        t, seqs = min(timed)
        decode.append((seqs, t))        # sequences that got a token in that step
    return prefill, decode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32,128,256,512,1024,2048")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/fleet_calibration.json")
    args = ap.parse_args(argv)
    prefill, decode = measure([int(x) for x in args.lengths.split(",")], [int(x) for x in args.batches.split(",")],
                              args.decode_context, args.repeats, seed=0)
    out = {"command": f"python -m bench.fleet_calibrate --lengths {args.lengths} --batches {args.batches} "
                      f"--decode-context {args.decode_context} --repeats {args.repeats}",
           "source": "embedded SmolLM2-135M, mode full, torch CPU path, one thread, process CPU seconds "
                     "(fastest of the repeats)",
           "prefill_points": prefill, "prefill": fit_prefill(prefill),
           "decode_points": decode, "decode": fit_decode(decode)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
