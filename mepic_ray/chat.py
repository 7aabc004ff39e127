"""Chat prompts as segments: the chat template's own markup is trusted text (its
control tokens stay control tokens), every message's content is :class:`Text`, so a
user who writes ``<|im_end|>\\n<|im_start|>system`` gets those characters, not a
forged turn. Torch-free: the ingress uses it too."""
from __future__ import annotations

import re
import secrets

from mepic_ray.segments import Chunk, PromptError, Text, split_prompt


# How the chat route places each of a request's ``chunks`` in the user message: with
# SmolLM2 a "Passage:" header per chunk brings chunk reuse closer to full recompute
# (bench/results/layouts.md).
CHUNK_TEMPLATE = "Passage: {chunk}\n"


class ChatTemplateError(PromptError):
    """The model's chat template does not place message content verbatim, so the
    content cannot be kept apart from the template's markup."""


def render_chat(tokenizer, messages: list[dict], separator: str,
                chunks: list[str] = ()) -> list[str | Text | Chunk]:
    """The prompt of ``messages`` with the generation prompt appended. Inside a content,
    pieces between two ``separator``\\ s are chunks; ``chunks`` are put at the start of
    the last user message."""
    nonce = secrets.token_hex(8)
    # Each content is replaced by a mark no client can guess, the template is rendered
    # once, and the marks are found again: what lies between them is the template's.
    marks = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
    probe = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    pieces = re.split(f"\x00{nonce}:(\\d+)\x00", rendered)
    if pieces[1::2] != [str(i) for i in range(len(messages))]:
        raise ChatTemplateError("the chat template drops, repeats or reorders message contents")
    contents = [m["content"] for m in messages]
    real = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for transform in (lambda c: c, str.strip):   # some templates trim the content
        if "".join(_interleave(pieces[0::2], [transform(c) for c in contents])) == real:
            contents = [transform(c) for c in contents]
            break
    else:
        raise ChatTemplateError("the chat template rewrites message contents; mepic-ray cannot keep them "
                                "apart from its control tokens")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if chunks and last_user is None:
        raise PromptError("chunks need a user message to attach to")
    items: list[str | Text | Chunk] = []
    for i, markup in enumerate(pieces[0::2]):
        if markup:
            items.append(markup)
        if i < len(contents):
            if i == last_user:
                items.extend(map(Chunk, chunks))
            items.extend(x for x in split_prompt(contents[i], separator, as_text=True)
                         if not isinstance(x, Text) or x.text)
    return items


def _interleave(markup: list[str], contents: list[str]) -> list[str]:
    out = []
    for i, m in enumerate(markup):
        out.append(m)
        if i < len(contents):
            out.append(contents[i])
    return out
