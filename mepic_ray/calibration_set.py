"""A small built-in calibration set: invented passages (so a model cannot answer from
what it memorised) and a question on each, in the prompt layouts users send: the chat
route with chunks (each chunk as the route formats it, ``chat.CHUNK_TEMPLATE``), and
plain completions; ``*_bare`` / ``*_headers`` variants for measuring layouts."""
from __future__ import annotations

import random

from mepic_ray.segments import Chunk, Text

PASSAGES = [
    ("The lighthouse at Varna Point was built in 1894 by the engineer Ilse Marrow. Its lamp burned "
     "whale oil until 1921, when it was converted to electric light.", "Who built the lighthouse at Varna Point?"),
    ("Quillfield is a small town known for its annual kite festival, held every April on the dunes "
     "north of the harbour. The largest kite flown there spanned forty metres.", "When is the kite festival held?"),
    ("The Orsk river rises in the Tallow Hills and flows 310 kilometres east before it joins the "
     "Mere. Barges carried timber along it until the railway opened.", "How long is the Orsk river?"),
    ("Professor Adaeze Holm discovered the blue-banded newt in the marshes of Keld in 1978. The newt "
     "is active only at night and feeds on mosquito larvae.", "Who discovered the blue-banded newt?"),
    ("The Tessaly Orchestra performs in a hall made of cedar wood, opened in 1962. Its conductor, "
     "Mirko Dane, has led it for twenty-two seasons.", "What is the concert hall made of?"),
    ("Brennan's bakery in Old Cairnford sells a rye loaf baked with caraway and honey. The recipe "
     "came from the founder's grandmother, who brought it from Lund.", "What is baked into the rye loaf?"),
    ("The glacier above Hollin valley has retreated 800 metres since 1950. Researchers measure it "
     "each September with drones launched from the old shepherd's hut.", "How far has the glacier retreated?"),
    ("In the game of stonecall, each player places nine pebbles on a board of seven rings. A player "
     "wins by capturing the centre ring twice in a row.", "How many pebbles does each player place?"),
    ("The Marisol ferry crosses from Pell to Ostra Island in fifty minutes. It runs four times a day "
     "in summer and twice a day in winter.", "How long does the Marisol ferry take?"),
    ("Copperleaf tea is grown on terraces above the village of Sunhe, at 1,400 metres. Its leaves are "
     "picked by hand in the first two weeks of May.", "At what altitude is Copperleaf tea grown?"),
    ("The clock tower in Randholm square has four faces and a single bell named Old Agnes, cast in "
     "1811. The bell cracked in 1907 and was recast the following year.", "What is the bell called?"),
    ("Nadia Ferro won the Keswick marathon three times, in 2009, 2011 and 2014. She now coaches young "
     "runners at the club in Ambleford.", "Where does Nadia Ferro coach?"),
    ("The library of Saint Oda holds 12,000 handwritten books. Its oldest book, a herbal, was copied "
     "by monks around the year 1150.", "How many handwritten books does the library hold?"),
    ("Tarn sheep have black faces and grey wool, and are bred mainly on the island of Skeld. Their wool "
     "is used for the island's heavy winter coats.", "Where are Tarn sheep bred?"),
    ("The Velum bridge, finished in 1988, is a suspension bridge 1.2 kilometres long. It replaced a "
     "ferry that had carried cars across the strait since 1931.", "When was the Velum bridge finished?"),
    ("Fennick's comet returns every 37 years. It was last seen in 2003, when amateur astronomers in "
     "Porto Brava photographed its split tail.", "How often does Fennick's comet return?"),
]
SYSTEM = "Answer the question with a short phrase taken from the passages."
FORMATS = ("chat", "plain")                       # what the quality gate may check
LAYOUTS = FORMATS + ("chat_bare", "plain_headers")   # ... and what bench.layouts compares


def calibration_prompts(tokenizer, separator: str, fmt: str, num_prompts: int = 8, passages: int = 4,
                        seed: int = 0) -> list[list]:
    """Prompts of ``passages`` chunks each, the asked-about passage at a random place among
    others, in format ``chat`` (the chat route's layout) or ``plain``."""
    from mepic_ray.chat import CHUNK_TEMPLATE, render_chat
    if fmt not in LAYOUTS:
        raise ValueError(f"format must be one of {LAYOUTS}, got {fmt!r}")
    rng = random.Random(seed)
    prompts = []
    for i in range(num_prompts):
        target = i % len(PASSAGES)
        others = rng.sample([j for j in range(len(PASSAGES)) if j != target], passages - 1)
        order = others[:]
        order.insert(rng.randrange(passages), target)
        docs = [PASSAGES[j][0] for j in order]
        question = PASSAGES[target][1]
        template = CHUNK_TEMPLATE if fmt in ("chat", "plain_headers") else "{chunk}\n"
        chunks = [template.replace("{chunk}", d) for d in docs]
        if fmt.startswith("chat"):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question: {question}"}]
            prompts.append(render_chat(tokenizer, messages, separator, chunks))
        else:
            prompts.append([Text(SYSTEM + "\n\n"), *map(Chunk, chunks), Text(f"\nQuestion: {question}\nAnswer:")])
    return prompts
