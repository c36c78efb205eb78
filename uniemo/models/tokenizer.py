"""A CLIP BPE tokenizer built locally, with no model hub (D3).

The vocabulary follows OpenAI CLIP's layout: the 256 byte-level characters (GPT-2's ``bytes_to_unicode`` map),
the same 256 characters with the end-of-word suffix ``</w>``, then ``<|startoftext|>`` and ``<|endoftext|>``.
There are no merges, so every word is spelled out character by character: fine for random test models and the
CPU demo, where the text towers are trained (or random) on this vocabulary anyway. Real runs load the
tokenizer that ships with the pretrained Stable Diffusion / CLIP folder instead.

The tokenizer is a ``transformers.CLIPTokenizer``, so ``CLIPTokenizer.from_pretrained(save_dir)`` and a
diffusers ``StableDiffusionPipeline`` reload it, and ``add_tokens`` adds placeholder tokens such as ``<awe>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import AddedToken, CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77
"""CLIP's context length (METHOD §1)."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def local_vocabulary() -> dict[str, int]:
    """The byte-level character vocabulary in CLIP's order: chars, chars + ``</w>``, BOS, EOS (514 entries)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def build_local_tokenizer(
    save_dir: str | Path | None = None, extra_tokens: Sequence[str] = (), words: Sequence[str] = ()
) -> CLIPTokenizer:
    """Build a CLIP tokenizer with a byte-level character vocabulary and no merges.

    ``extra_tokens`` are added with ``add_tokens`` (whole-word tokens such as a placeholder ``<dummy>``).
    ``words`` are added as single-word tokens: ``blue`` is one token where it stands as a word, but not inside
    ``bluebell`` (the caption vocabulary of the pretrained CPU generator, METHOD D15). When
    ``save_dir`` is given the tokenizer is saved there (``tokenizer.json`` plus CLIP's classic
    ``vocab.json`` / ``merges.txt``), so ``CLIPTokenizer.from_pretrained(save_dir)`` reloads it.
    """
    vocab = local_vocabulary()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_LENGTH,
    )
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    if words:
        tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in words])
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
        # The classic files too, so loaders that ignore tokenizer.json (older transformers) also work.
        (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (save_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return tokenizer
