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


PromptInput = Union[str, Sequence[Union[str, Chunk]]]


class PromptError(ValueError):
    """The prompt cannot be turned into segments (empty, wrong types, bad chunks)."""


@dataclass
class Segment:
    is_chunk: bool
    token_ids: list[int]


def split_prompt(prompt: PromptInput, separator: str) -> list[str | Chunk]:
    """A plain string marks chunks with ``separator``: the pieces strictly between
    two separators are chunks (LMCache's ``blend_special_str`` convention)."""
    if isinstance(prompt, str):
        parts = prompt.split(separator)
        if len(parts) < 3:
            return [prompt]
        return [parts[0], *(Chunk(p) for p in parts[1:-1]), parts[-1]]
    if isinstance(prompt, (list, tuple)):
        for i, p in enumerate(prompt):
            if not isinstance(p, (str, Chunk)):
                raise PromptError(f"prompt item {i} must be str or Chunk, got {type(p).__name__}")
        return list(prompt)
    raise PromptError(f"prompt must be a str or a list of str and Chunk, got {type(prompt).__name__}")


def tokenize_segments(items: list[str | Chunk], encode, bos_token_id: int | None) -> list[Segment]:
    """Each chunk is tokenized on its own so its tokens (and hash) do not depend
    on its neighbours; adjacent text pieces are merged first."""
    segments: list[Segment] = []
    pending_text = ""
    for i, item in enumerate(items):
        if isinstance(item, Chunk):
            if pending_text:
                segments.append(Segment(False, encode(pending_text)))
                pending_text = ""
            ids = encode(item.text)
            if not ids:
                raise PromptError(f"chunk at item {i} is empty")
            segments.append(Segment(True, ids))
        else:
            pending_text += item
    if pending_text:
        segments.append(Segment(False, encode(pending_text)))
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
