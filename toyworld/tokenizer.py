"""A CLIP tokenizer whose vocabulary is the toy world's words, one token per word.

``StableDiffusionPipeline`` expects a ``CLIPTokenizer`` (byte-pair encoding). A vocabulary of
whole words alone silently drops every word longer than one character, because BPE builds words
from characters through ``merges.txt`` (see ../shared/FIELD_NOTES.md). So the vocabulary holds
every character, and for each word we append the merges that the tokenizer, as built so far,
still needs to join that word into one token. A merge appended later has a larger rank than every
earlier one, so it never changes how an earlier word is split: ``test_tokenizer_one_id_per_word``
checks the result.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from transformers import CLIPTokenizer

WORDS = (
    "a",
    "an",
    "the",
    "and",
    "of",
    "on",
    "in",
    "with",
    "left",
    "right",
    "red",
    "yellow",
    "green",
    "blue",
    "purple",
    "gray",
    "grey",
    "circle",
    "square",
    "triangle",
    "star",
    "shape",
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split ``word`` (with its ``</w>`` end mark) the way CLIP's BPE does with ``ranks``."""
    parts = [*list(word[:-1]), word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        known = [p for p in pairs if p[0] is not None]
        if not known:
            break
        _, i = min(known)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_vocab(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return ``(vocab, merges)`` such that every word of ``words`` is a single token."""
    chars = sorted({c for w in words for c in w})
    tokens = [BOS, EOS] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tokenizer(folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write ``vocab.json`` + ``merges.txt`` into ``folder`` and return the loaded tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=EOS,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
