"""Prompts as segments: text and chunks (documents reused at any position)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union


@dataclass(frozen=True)
class Chunk:
    """A document whose KV is cached independently of where it appears."""
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Chunk text must be str, got {type(self.text).__name__}")


@dataclass(frozen=True)
class Text:
    """Text from a client or an end user (a chat message, an HTTP prompt). Control-token
    markers in it (``<|im_end|>``) are tokenized as the characters they spell: only the
    prompt's own markup (plain ``str`` items, the chat template's text) makes control
    tokens, so user text cannot forge a turn."""
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Text must be str, got {type(self.text).__name__}")


PromptInput = Union[str, Sequence[Union[str, Text, Chunk]]]


class PromptError(ValueError):
    """The prompt cannot be turned into segments (empty, wrong types, bad chunks)."""


@dataclass
class Segment:
    is_chunk: bool
    token_ids: list[int]


def split_prompt(prompt: PromptInput, separator: str, as_text: bool = False) -> list[str | Text | Chunk]:
    """A plain string marks chunks with ``separator``: the pieces strictly between
    two separators are chunks (LMCache's ``blend_special_str`` convention). With
    ``as_text`` the pieces outside chunks are :class:`Text`."""
    if isinstance(prompt, str):
        parts = prompt.split(separator)
        wrap = Text if as_text else str
        if len(parts) < 3:
            return [wrap(prompt)]
        return [wrap(parts[0]), *(Chunk(p) for p in parts[1:-1]), wrap(parts[-1])]
    if isinstance(prompt, Text):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        for i, p in enumerate(prompt):
            if not isinstance(p, (str, Text, Chunk)):
                raise PromptError(f"prompt item {i} must be str, Text or Chunk, got {type(p).__name__}")
        return list(prompt)
    raise PromptError(f"prompt must be a str, a Text or a list of str, Text and Chunk, got {type(prompt).__name__}")


def text_tokenizer(tokenizer):
    """A copy of a Hugging Face tokenizer that tokenizes control-token markers as the
    characters they spell. A copy, not a per-call flag: the flag lives on the shared
    Rust tokenizer, and threads tokenizing at once would race on it."""
    import copy
    text = copy.deepcopy(tokenizer)
    text.split_special_tokens = True
    return text


def tokenize_segments(items: list[str | Text | Chunk], encode, bos_token_id: int | None,
                      encode_text=None) -> list[Segment]:
    """Each chunk is tokenized on its own so its tokens (and hash) do not depend
    on its neighbours; adjacent pieces of the same kind are merged first. ``encode``
    tokenizes markup (``str``), ``encode_text`` (default: ``encode``) user text and
    chunks, with control-token markers as text."""
    encode_text = encode_text or encode
    segments: list[Segment] = []
    run: list[str] = []
    run_is_text = False

    def flush() -> None:
        if run:
            ids = (encode_text if run_is_text else encode)("".join(run))
            if segments and not segments[-1].is_chunk:    # markup then user text: one text segment
                segments[-1].token_ids.extend(ids)
            else:
                segments.append(Segment(False, list(ids)))
            run.clear()

    for i, item in enumerate(items):
        if isinstance(item, Chunk):
            flush()
            ids = encode_text(item.text)
            if not ids:
                raise PromptError(f"chunk at item {i} is empty")
            segments.append(Segment(True, list(ids)))
            continue
        is_text = isinstance(item, Text)
        if is_text != run_is_text:
            flush()
            run_is_text = is_text
        run.append(item.text if is_text else item)
    flush()
    segments = [s for s in segments if s.token_ids]
    if not segments:
        raise PromptError("prompt is empty")
    # The last token must be computed in context to produce logits, so a
    # trailing chunk is treated as prompt text.
    if segments[-1].is_chunk:
        segments[-1] = Segment(False, segments[-1].token_ids)
    if bos_token_id is not None:
        if segments[0].is_chunk:
            segments.insert(0, Segment(False, [bos_token_id]))
        else:
            segments[0].token_ids.insert(0, bos_token_id)
    return segments
