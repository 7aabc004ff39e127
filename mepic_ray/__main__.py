"""`python -m mepic_ray`: an offline demo on the embedded model.

Three questions over the same documents in different orders: the documents are
compiled once, then every later request reuses their blocks and recomputes only
each chunk's first block.
"""
import argparse

from mepic_ray import LLM, Chunk, SamplingParams

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair.",
    "Mount Everest, at 8,849 metres, is Earth's highest mountain above sea level, in the Himalayas.",
    "The Amazon is the largest rainforest on Earth and spans nine countries in South America.",
]
QUESTIONS = [(0, 1, 2, "When was the Eiffel Tower completed?"),
             (2, 0, 1, "How high is Mount Everest?"),
             (1, 2, 0, "How many countries does the Amazon span?")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="HF folder or GGUF file (default: embedded SmolLM2)")
    ap.add_argument("--mode", default="mepic")
    args = ap.parse_args()
    llm = LLM(args.model, mode=args.mode, kv_cache_bytes=64 * 2**20)
    params = SamplingParams(max_tokens=24, temperature=0)
    for *order, q in QUESTIONS:
        prompt = ["<|im_start|>user\nAnswer from the documents.\n", *(Chunk(DOCS[i]) for i in order),
                  f"\nQuestion: {q}<|im_end|>\n<|im_start|>assistant\n"]
        out = llm.generate(prompt, params)[0]
        print(f"Q: {q}\nA: {out.text.strip()}\n   prompt={out.stats.prompt_tokens} cached={out.stats.cached_tokens} "
              f"recomputed={out.stats.recomputed_tokens} compiled={out.stats.compiled_tokens} ttft={out.stats.ttft_s:.2f}s")
    print("KV blocks:", llm.stats())


if __name__ == "__main__":
    main()
