"""The scheduler's effect: inter-token latency under Poisson load, and how many requests
run at once in a fixed pool. Only APIs that exist before and after the chunked-prefill
scheduler are used, so the same file measures both versions of the package.

    python -m bench.scheduler --part itl --modes full,mepic --chunks 16 --reuse 1.0 --pool 24 --qps 4 \
        --requests 24 --max-tokens 12 --kv-bytes 2147483648 --batch-tokens 512 --label after --out bench/results/sched_after
    python -m bench.scheduler --part capacity --modes mepic --capacity-blocks 2000 --capacity-requests 64 \
        --label after --out bench/results/sched_cap_after
    python -m bench.scheduler --merge bench/results/sched_before.json bench/results/sched_after.json \
        --out bench/results/sched_compare

``itl`` replays the SQuAD trace through ``bench.rag.run_mode`` (Poisson arrivals, the
engine's own step loop) with the engine's ``step`` wrapped to time every step and every
token each request receives (the end of the step that produced it). ``capacity`` submits
all requests at once to a ``--capacity-blocks`` pool; each asks for 512 tokens
(``ignore_eos``) and the driver aborts it once it holds ``--stop-after`` tokens, so
answers are short but admission sees ``max_tokens=512``. ``--label`` names the run;
``--merge`` tabulates two or more runs' JSON (ratios: last label / first label).
Writes OUT.json, OUT.md and OUT_itl_cdf.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench.common import pct, split_configs
from bench.fidelity import parse_config
from bench.rag import run_mode
from bench.scheduler_report import write_report
from bench.squad import build_trace, workload_stats
from mepic_ray import LLM, SamplingParams

LIMIT_DOC = ("Dedup limit: the peak over steps of the number of distinct KV pages that the requests running in "
             "the step (and those finishing in it) would hold with ideal sharing, from their layouts: each chunk "
             "block past the mode's recomputed leading blocks (`kv.recomputed_blocks`) once per (chunk hash, "
             "block); each other full prompt block but the last once per prefix-chain hash; every other page "
             "(last prompt block, recomputed chunk blocks, generated tokens: `ceil(len(token_ids)/block_size)` "
             "pages in all) private. Modes without a chunk layout (full, prefix) share only prefix-chain blocks "
             "here. Peak blocks is `kv.pool.peak_used` (also counts compile scratch and selection spares).")


def q(xs: list[float], p: float):
    return pct(xs, p) if xs else None


def portable(arg: str) -> str:
    """An absolute path in the command line becomes relative (or its file name)."""
    key, eq, val = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if os.path.isabs(val):
        rel = os.path.relpath(val)
        val = os.path.basename(val.rstrip("/")) if rel.startswith("..") else rel
    return key + eq + val


def make_llm(args, mode: str, **kw) -> LLM:
    base, options = parse_config(mode)
    if base == "mepic":
        options.setdefault("recompute_blocks", args.mepic_recompute_blocks)
    return LLM(args.model, mode=base, block_size=args.block_size, max_num_batched_tokens=args.batch_tokens,
               mode_options=options, **kw)


class Recorder:
    """Wraps an engine's ``enqueue`` and ``step``: token wall times per request, each
    step's duration and queues, and the dedup limit (LIMIT_DOC)."""

    def __init__(self, eng, args):
        self.eng, self.args, self.bs = eng, args, args.block_size
        self._step, self._enqueue = eng.step, eng.enqueue
        eng.step, eng.enqueue = self.step, self.enqueue
        self.live, self.times, self.keys, self.steps, self.limit = {}, {}, {}, [], 0
        self.t0 = time.perf_counter()

    def enqueue(self, req):
        self.live[req.request_id], self.times[req.request_id] = req, []
        return self._enqueue(req)

    def step(self):
        if time.perf_counter() - self.t0 > self.args.time_limit or len(self.steps) >= self.args.max_steps:
            raise TimeoutError("--time-limit or --max-steps reached")
        s0 = time.perf_counter()
        results, done = self._step(), []
        s1 = time.perf_counter()
        for out in results:
            ts = self.times[out.request_id]
            ts.extend([s1 - self.t0] * (len(out.token_ids) - len(ts)))
            if out.finished:
                done.append(self.live.pop(out.request_id))
        st = self.eng.stats()
        running = getattr(self.eng.scheduler, "running", None)
        if running is None:   # else the requests' own status
            running = [r for r in self.live.values() if getattr(getattr(r, "status", None), "name", "") == "RUNNING"]
        self.limit = max(self.limit, self.ideal_pages(list(running) + done))
        self.steps.append([round(s0 - self.t0, 4), round(s1 - s0, 5), st["running"], st["waiting"],
                           st.get("step_tokens")])
        return results

    def prompt_keys(self, req) -> list:
        """The prompt's shareable pages: its chunks' canonical blocks, then (where the
        layout has block hashes) its other full prompt blocks but the last."""
        lay, bs = req.layout, self.bs
        got = self.keys.get(req.request_id)
        if got is None or got[0] is not lay:     # a preempted request's layout is extended
            keys, shared = [], set()
            for c in lay.chunks:
                r = min(self.eng.kv.recomputed_blocks(c.padded_ids), c.num_blocks)
                keys += [("c", c.chunk_hash, j) for j in range(r, c.num_blocks)]
                if hasattr(c, "first_block"):
                    shared.update(range(c.first_block + r, c.first_block + c.num_blocks))
            hashes = getattr(lay, "block_hashes", None) if len(shared) == len(keys) else None
            last = -(-len(lay.token_ids) // bs) - 1      # it makes the logits: never a prefix hit
            keys += [("p", hashes[b]) for b in range(min(last, len(hashes or ()))) if b not in shared and hashes[b]]
            got = self.keys[req.request_id] = (lay, keys)
        return got[1]

    def ideal_pages(self, reqs) -> int:
        pages = set()
        for r in reqs:
            keys = self.prompt_keys(r)
            pages.update(keys)
            pages.update(("r", r.request_id, i) for i in range(-(-len(r.token_ids) // self.bs) - len(keys)))
        return len(pages)


def run_itl(args, llm: LLM, trace, bar) -> dict:
    eng = llm.engine
    rec = Recorder(eng, args)
    try:
        stop = dict(ignore_eos=True) if args.fixed_length else dict(stop=["\n"])    # bench.rag's
        result = run_mode(llm, trace, args.qps, args.seed,
                          SamplingParams(max_tokens=args.max_tokens, temperature=0, **stop), bar)
        del result["timeline"]      # step_log holds it
    except TimeoutError:
        result = {}
    gaps = [b - a for ts in rec.times.values() for a, b in zip(ts, ts[1:])]
    durs = [s[1] for s in rec.steps]
    peak, st = eng.kv.pool.peak_used, eng.stats()
    return {**result, "requests": len(trace), "finished": len(rec.times) - len(rec.live), "timed_out": not result,
            "steps": len(rec.steps), "wall_s": time.perf_counter() - rec.t0,
            "itl_p50_s": q(gaps, 0.5), "itl_p99_s": q(gaps, 0.99), "itl_max_s": max(gaps, default=None),
            "step_p50_s": q(durs, 0.5), "step_p99_s": q(durs, 0.99), "step_max_s": max(durs, default=None),
            "running_max": max((s[2] for s in rec.steps), default=0),
            "waiting_max": max((s[3] for s in rec.steps), default=0),
            "preemptions": st.get("preemptions"), "peak_blocks": peak, "dedup_limit_blocks": rec.limit,
            "peak_over_limit": peak / rec.limit if rec.limit else None, "total_blocks": st["total_blocks"],
            "itl_s": [round(g, 5) for g in gaps],
            "step_log": {"columns": ["start_s", "duration_s", "running", "waiting", "step_tokens"], "rows": rec.steps}}


def run_capacity(args, llm: LLM, trace, bar) -> dict:
    eng = llm.engine
    params = SamplingParams(max_tokens=512, temperature=0, ignore_eos=True)
    reqs = [eng.make_request(r.prompt, params, request_id=f"c{i}") for i, r in enumerate(trace)]
    t0 = time.perf_counter()
    for r in reqs:
        eng.enqueue(r)
    pending, running, tokens = {r.request_id for r in reqs}, [], []
    while eng.has_unfinished() and time.perf_counter() - t0 <= args.time_limit and len(running) < args.max_steps:
        results = eng.step()
        running.append(eng.stats()["running"])     # before the aborts: these ran in the step
        for out in results:
            if out.request_id in pending and (out.finished or len(out.token_ids) >= args.stop_after):
                if not out.finished:
                    eng.abort(out.request_id)
                pending.discard(out.request_id)
                tokens.append(len(out.token_ids))
                bar.update(1)
    st = eng.stats()
    return {"requests": len(reqs), "done": len(tokens), "timed_out": eng.has_unfinished(), "steps": len(running),
            "wall_s": time.perf_counter() - t0, "running_max": max(running, default=0),
            "running_mean": float(statistics.mean(running)) if running else 0.0,
            "tokens_per_request": statistics.mean(tokens) if tokens else 0.0, "preemptions": st.get("preemptions"),
            "peak_blocks": eng.kv.pool.peak_used, "total_blocks": st["total_blocks"]}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["itl", "capacity", "both"], default="both")
    ap.add_argument("--model", default=None, help="HF folder or GGUF; default: the embedded SmolLM2")
    ap.add_argument("--modes", default="full,mepic", help="comma list, as bench.rag (mepic@K, mode:key=value)")
    for name, kind, default in [("chunks", int, 16), ("reuse", float, 1.0), ("pool", int, 24), ("qps", float, 4.0),
                                ("requests", int, 24), ("max-tokens", int, 12), ("kv-bytes", int, 2 * 2**30),
                                ("batch-tokens", int, 4096), ("max-seqs", int, 32), ("block-size", int, 16),
                                ("mepic-recompute-blocks", int, 1), ("seed", int, 0)]:
        ap.add_argument(f"--{name}", type=kind, default=default, help="as in bench.rag")
    for name, kind, default, what in [("capacity-blocks", int, 2000, "capacity: the pool, in blocks"),
                                      ("capacity-requests", int, 64, "capacity: requests, all submitted at once"),
                                      ("capacity-seqs", int, 256, "capacity: max_num_seqs"),
                                      ("stop-after", int, 16, "capacity: tokens after which a request is aborted"),
                                      ("time-limit", float, 3600.0, "seconds per mode and part"),
                                      ("max-steps", int, 200000, "engine steps per mode and part")]:
        ap.add_argument(f"--{name}", type=kind, default=default, help=what)
    ap.add_argument("--fixed-length", action="store_true", help="itl: every answer --max-tokens long (ignore_eos, "
                    "no stop string); default: bench.rag's answers, which stop at a newline or EOS")
    ap.add_argument("--label", default="run")
    ap.add_argument("--merge", nargs="+", default=None, help="JSON files of earlier runs to compare")
    ap.add_argument("--out", default="bench/results/scheduler")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.scheduler " + " ".join(shlex.quote(portable(a)) for a in argv)
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        header = [f"# Scheduler benchmark: {' vs '.join(r['label'] for r in runs)}\n", f"Command: `{command}`\n"]
        header += [f"- {r['label']}: `{r['command']}`" for r in runs] + ["", LIMIT_DOC + "\n"]
        result = {"command": command, "labels": [r["label"] for r in runs], "runs": runs}
    else:
        modes = split_configs(args.modes)
        result = {"command": command, "label": args.label}
        parts = ["itl", "capacity"] if args.part == "both" else [args.part]
        for part in parts:
            n = args.requests if part == "itl" else args.capacity_requests
            trace = build_trace(n, args.chunks, args.reuse, args.pool, args.seed)
            res = result[part] = {"modes": {}}
            with tqdm(total=n * len(modes), desc=part) as bar:
                for mode in modes:
                    llm = make_llm(args, mode, **(dict(kv_cache_bytes=args.kv_bytes, max_num_seqs=args.max_seqs)
                                                  if part == "itl" else
                                                  dict(num_blocks=args.capacity_blocks, max_num_seqs=args.capacity_seqs)))
                    if "workload" not in res:
                        res["workload"] = workload_stats(trace, lambda s: len(llm.engine.encode(s)))
                    res["modes"][mode] = (run_itl if part == "itl" else run_capacity)(args, llm, trace, bar)
                    del llm
        w, runs = result[parts[0]]["workload"], [result]
        header = [f"# Scheduler benchmark ({args.label})\n", f"Command: `{command}`\n",
                  f"Workload ({parts[0]}): {w['requests']} requests, {w['mean_prompt_tokens']:.0f} prompt tokens per "
                  f"request, reuse ratio {w['reuse_ratio']:.1%}, {w['distinct_passages']} distinct passages. A token's "
                  "time is the end of the step that produced it; ITL: gaps between successive tokens of one request, "
                  "over all requests; step: wall time of `engine.step()`.\n", LIMIT_DOC + "\n"]
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1))
    print(write_report(runs, out, header))
    return result


if __name__ == "__main__":
    main()
