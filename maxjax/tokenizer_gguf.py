"""The tokenizer of a GGUF file, rebuilt from its metadata as transformers converts the same metadata.

llama.cpp keeps the vocabulary, merges, token types and special ids as metadata; `load_gguf_tokenizer` builds the
equivalent `tokenizers.Tokenizer`: byte-level BPE for `tokenizer.ggml.model = gpt2` (split regex chosen by
`tokenizer.ggml.pre`), and SentencePiece-style BPE with byte fallback for `llama` (merges from the file, or
rebuilt from the token scores). The token-bytes rules it shares with Hugging Face directories are in
`maxjax.tokenizer`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from maxjax.errors import UserError
from maxjax.tokenizer import (
    _ALPHABET,
    Tokenizer,
    _byte_level_bytes,
    _sentencepiece_bytes,
    _set_post_processor,
    _spell_bytes,
)

logger = logging.getLogger(__name__)

_TEMPLATE_TOKENS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}

_TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED = 2, 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How a byte-level vocabulary cuts text into words before merging (llama.cpp's `tokenizer.ggml.pre`)."""

    splits: tuple[str, ...]
    """Regexes applied in order; each cuts every piece so far around its matches (tokenizers' "isolated")."""
    ignore_merges: bool = False
    """A word that is itself a token is taken whole (llama.cpp and the original tokenizer.json for Llama 3)."""
    add_bos: bool = False
    """llama.cpp's default for adding BOS when the file has no `tokenizer.ggml.add_bos_token`."""


def _names(spec: PreTokenizerSpec, names: str) -> dict[str, PreTokenizerSpec]:
    return dict.fromkeys(names.split(), spec)


# Names as llama.cpp's llama-vocab.cpp groups them. Unknown names are an error, as in llama.cpp: a wrong split
# still tokenizes, only worse, and nobody would notice. "default" (and a file without the key) gets GPT-2's
# split, as in transformers; llama.cpp's own "default" split is a fallback it warns about.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **_names(PreTokenizerSpec((_GPT2_SPLIT,)), "default gpt2 gpt-2 phi-2 mpt olmo jais exaone4"),
    **_names(
        PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT)),
        "smollm starcoder refact command-r codeshell exaone minerva-7b",
    ),
    **_names(
        PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
    ),
    **_names(PreTokenizerSpec((_LLAMA3_SPLIT,)), "dbrx smaug-bpe"),
    **_names(
        PreTokenizerSpec((_QWEN2_SPLIT,)), "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan"
    ),
    **_names(PreTokenizerSpec((_GPT4O_SPLIT,)), "gpt-4o llama4 kanana2 talkie minimax-m2"),
    "tekken": PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
}

# SentencePiece vocabularies whose conversion differs from plain llama (respelled spaces, merge order, normalizer).
_UNSUPPORTED_SPM_ARCHS = frozenset({"gemma", "gemma2", "gemma3", "phi3"})


def _gguf_int(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return int(value) if value is not None else None


def _byte_level_backend(
    tokens: list[str], raw_ids: frozenset[int], merges: list[str], pre: PreTokenizerSpec
) -> tuple[tokenizers.Tokenizer, list[bytes]]:
    # Normal tokens are spelled in the byte alphabet; control, user-defined and named special tokens are stored as
    # the raw text they match (llama.cpp's converter writes them so; transformers skips those it cannot spell).
    # A normal token that is not spelled is respelled, as transformers does.
    vocab = {
        tok if i in raw_ids or _ALPHABET.issuperset(tok) else _spell_bytes(tok): i
        for i, tok in enumerate(tokens)
    }
    model = models.BPE(
        vocab=vocab, merges=_merge_pairs(merges), ignore_merges=pre.ignore_merges, fuse_unk=False
    )
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, [_byte_level_bytes(t) for t in tokens]


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    split = [m.split(" ") for m in merges]
    if any(len(p) != 2 for p in split):
        raise UserError(
            "GGUF tokenizer.ggml.merges has an entry that is not two tokens separated by one space"
        )
    return [(p[0], p[1]) for p in split]


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two tokens, the merged token's
    score deciding the order (ties: longer left, then longer right piece first), as transformers derives them."""
    ids = {tok: i for i, tok in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, score in dict(zip(tokens, scores, strict=True)).items():
        splits = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in ids and tok[k:] in ids]
        splits.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in splits)
    ranked.sort(key=lambda r: r[:3], reverse=True)  # stable: equal keys keep vocabulary order
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_backend(
    tokens: list[str], metadata: Mapping[str, Any], unk: str | None
) -> tuple[tokenizers.Tokenizer, list[bytes], bool]:
    if "tokenizer.ggml.merges" in metadata:
        merges = _merge_pairs(list(metadata["tokenizer.ggml.merges"]))
    elif "tokenizer.ggml.scores" in metadata:
        merges = _sentencepiece_merges(tokens, [float(s) for s in metadata["tokenizer.ggml.scores"]])
    else:
        raise UserError(
            "GGUF SentencePiece vocabulary has neither tokenizer.ggml.scores nor tokenizer.ggml.merges"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend, [_sentencepiece_bytes(t) for t in tokens], prefix


def _add_special_tokens(backend: tokenizers.Tokenizer, special: list[str], plain: list[str]) -> None:
    """Match these whole in text (before any splitting); they are already in the vocabulary, so ids stay put."""
    size = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    assert backend.get_vocab_size(with_added_tokens=True) == size, "an added token got a new id"


def load_gguf_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF file describes (`metadata` as `maxjax.weights.gguf.read_metadata` returns it)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    kind = metadata.get("tokenizer.ggml.model")
    if not tokens or kind is None:
        raise UserError(
            "the GGUF file has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens metadata)"
        )
    tokens = list(tokens)
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    if len(types) != len(tokens):
        raise UserError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    named = {
        name: _gguf_int(metadata, f"tokenizer.ggml.{name}_token_id")
        for name in ("bos", "eos", "unknown", "padding", "eot", "eom")
    }
    for name, token_id in named.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise UserError(
                f"GGUF tokenizer.ggml.{name}_token_id = {token_id} is outside the {len(tokens)}-token vocabulary"
            )
    text = {name: tokens[i] for name, i in named.items() if i is not None}
    named_ids = frozenset(i for i in named.values() if i is not None)
    special_ids = frozenset(i for i, ty in enumerate(types) if ty == _TT_CONTROL) | named_ids
    plain_ids = frozenset(i for i, ty in enumerate(types) if ty == _TT_USER_DEFINED) - named_ids

    strip = False
    if kind == "gpt2":
        pre_name = metadata.get("tokenizer.ggml.pre")
        if not pre_name:
            logger.warning("GGUF has no tokenizer.ggml.pre; splitting words as GPT-2 does")
            pre_name = "default"
        if pre_name not in PRE_TOKENIZERS:
            raise UserError(
                f"GGUF tokenizer.ggml.pre = {pre_name!r} is not a pre-tokenizer maxjax knows "
                f"(known: {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        pre = PRE_TOKENIZERS[pre_name]
        if "tokenizer.ggml.merges" not in metadata:
            raise UserError("GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")
        merges = list(metadata["tokenizer.ggml.merges"])
        backend, token_bytes = _byte_level_backend(tokens, special_ids | plain_ids, merges, pre)
        default_add_bos = pre.add_bos
    elif kind == "llama":
        arch = metadata.get("general.architecture")
        if arch in _UNSUPPORTED_SPM_ARCHS:
            raise UserError(f"GGUF SentencePiece tokenizers of architecture {arch!r} are not supported yet")
        backend, token_bytes, strip = _sentencepiece_backend(tokens, metadata, text.get("unknown"))
        # llama.cpp and transformers both add BOS to SentencePiece vocabularies by default.
        default_add_bos = True
    else:
        raise UserError(f"GGUF tokenizer.ggml.model = {kind!r} is not supported (supported: 'gpt2', 'llama')")

    _add_special_tokens(
        backend, [tokens[i] for i in sorted(special_ids)], [tokens[i] for i in sorted(plain_ids)]
    )

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)) and "bos" in text
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos" in text
    if add_bos or add_eos:
        _set_post_processor(
            backend, text["bos"] if add_bos else None, text["eos"] if add_eos else None, backend.get_vocab()
        )

    templates = {}
    for key, value in metadata.items():
        if key == "tokenizer.chat_template":
            templates["default"] = str(value)
        elif key.startswith("tokenizer.chat_template."):
            templates[key.removeprefix("tokenizer.chat_template.")] = str(value)
    strings = {f"{name}_token": text[key] for name, key in _TEMPLATE_TOKENS.items() if key in text}
    return Tokenizer(
        backend,
        token_bytes=token_bytes,
        special_ids=special_ids,
        bos_token_id=named["bos"],
        eos_token_ids=frozenset(i for k in ("eos", "eot", "eom") if (i := named[k]) is not None),
        add_bos_token=add_bos,
        chat_templates=templates,
        special_token_strings=strings,
        strip_leading_space=strip,
    )


# Template variable prefix -> GGUF special id name.
