"""Tokenizers: text to token ids and back, streaming detokenization, and the model's chat template.

One `Tokenizer` class, two sources:

- a Hugging Face model directory: `tokenizer.json` is loaded by the `tokenizers` library as it is;
- a GGUF file: llama.cpp keeps the vocabulary, merges, token types and special ids as metadata, and
  `maxjax.tokenizer_gguf` *builds* the equivalent `tokenizers.Tokenizer` from them.

Encoding goes through `tokenizers`. Decoding does not: each token's raw bytes are worked out once at load (byte-level
alphabet undone, SentencePiece's ▁ made a space, `<0xNN>` tokens made bytes), so `decode` and the streaming
`IncrementalDetokenizer` are the same function of the same bytes and always agree, and streaming costs O(token)
per token. Transformers' `clean_up_tokenization_spaces` is never applied (it rewrites " ." to "." and the like,
which corrupts code; recent HF configs turn it off).

Chat template rendering, the other concern, lives in `maxjax.chat_template`.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from maxjax.chat_template import ChatTemplateError, render_chat_template, select_chat_template
from maxjax.errors import UserError

logger = logging.getLogger(__name__)


class Tokenizer:
    """A vocabulary with its special tokens and chat templates. Build one with `load_hf_tokenizer` or
    `load_gguf_tokenizer`; the constructor is their common end.

    Ids outside the vocabulary (a model's embedding is often padded past it) decode to nothing, as in `tokenizers`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        token_bytes: list[bytes],
        special_ids: frozenset[int],
        bos_token_id: int | None,
        eos_token_ids: frozenset[int],
        add_bos_token: bool,
        chat_templates: Mapping[str, str],
        special_token_strings: Mapping[str, str],
        strip_leading_space: bool = False,
    ) -> None:
        self._backend = backend
        self._token_bytes = token_bytes
        self._special_ids = special_ids
        self._templates = dict(chat_templates)
        self._special_token_strings = dict(special_token_strings)
        self._strip_leading_space = strip_leading_space
        self.vocab_size: int = len(token_bytes)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: frozenset[int] = eos_token_ids
        self.add_bos_token: bool = add_bos_token
        self.chat_template: str | None = self._templates.get("default")

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` doing the encoding (e.g. to save it as tokenizer.json)."""
        return self._backend

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their ids.

        add_special_tokens adds what the model's post-processor adds (BOS where `add_bos_token`); it is off by
        default because a rendered chat template already holds its special tokens.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids` as a sequence start: bytes that are not valid UTF-8 become U+FFFD (one per maximal
        invalid run, as Python and Rust decode; tokenizers' SentencePiece ByteFallback gives one per byte there),
        and a SentencePiece vocabulary's prefix space is removed, as HF decodes."""
        n, tb, special = self.vocab_size, self._token_bytes, self._special_ids
        raw = b"".join(tb[i] for i in ids if 0 <= i < n and not (skip_special_tokens and i in special))
        text = raw.decode("utf-8", errors="replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes this token stands for; a token can hold part of a UTF-8 character."""
        return self._token_bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def token_text(self, token_id: int) -> str:
        """The token for display (logprobs): its bytes decoded, partial characters as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        """Control tokens (`<|im_end|>`, `<s>`) and the named bos/eos/unk/pad ids: what skip_special_tokens drops."""
        return token_id in self._special_ids

    def set_chat_template(self, source: str) -> None:
        """Replace the default chat template (`max serve --chat-template`)."""
        self._templates["default"] = source
        self.chat_template = source

    def chat_template_source(self, template: str | None = None, *, has_tools: bool = False) -> str | None:
        """The template source `apply_chat_template` would use (None when there is none to choose)."""
        try:
            return select_chat_template(self._templates, template, has_tools=has_tools)
        except ChatTemplateError:
            return None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        template: str | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`. `template` is a named template of this model or template source;
        `extra` (tools, documents, enable_thinking, ...) become template variables. Raises ChatTemplateError."""
        source = select_chat_template(self._templates, template, has_tools=bool(extra.get("tools")))
        return render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._special_token_strings,
            **extra,
        )

    def detokenizer(
        self, *, skip_special_tokens: bool = False, continuation: bool = False
    ) -> IncrementalDetokenizer:
        """A fresh streaming decoder; its output joined equals `decode(ids, skip_special_tokens=...)`.

        continuation=True: the ids continue a prompt (generated text), so a SentencePiece vocabulary's leading
        space is kept -- prompt text + this text then equals decode(prompt + generated), as vLLM and TGI stream
        it. decode() strips that space because it sees the start of a sequence. Byte-level vocabularies: no-op.
        """
        skipped = self._special_ids if skip_special_tokens else frozenset()
        strip = self._strip_leading_space and not continuation
        return IncrementalDetokenizer(self._token_bytes, skipped, strip_leading_space=strip)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces without ever cutting a UTF-8 character in two.

    Bytes of an unfinished character are held until the token that completes it arrives; Python's incremental
    UTF-8 decoder does exactly the lossy decoding `bytes.decode(errors="replace")` does, so the pieces joined equal
    `Tokenizer.decode` of the same ids.
    """

    def __init__(
        self, token_bytes: list[bytes], skipped: frozenset[int], *, strip_leading_space: bool
    ) -> None:
        self._token_bytes = token_bytes
        self._skipped = skipped
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = strip_leading_space  # SentencePiece: drop the space the encoder prepended

    def add(self, token_id: int) -> str:
        """The text this token completes ('' while a character is still partial)."""
        if token_id in self._skipped or not 0 <= token_id < len(self._token_bytes):
            return ""
        return self._emit(self._decoder.decode(self._token_bytes[token_id]))

    def flush(self) -> str:
        """What is left at the end of the sequence: an unfinished character comes out as U+FFFD."""
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text


# ---- byte-level alphabet (GPT-2): each byte is spelled as one printable character -------------------------------


def _byte_alphabet() -> dict[int, str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelling = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in spelling)
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelling


_BYTE_SPELLING = _byte_alphabet()
_ALPHABET = frozenset(_BYTE_SPELLING.values())
# str.translate to Latin-1 code points, then .encode("latin-1"): both in C, fast enough for 150k-token vocabularies.
_UNSPELL = {ord(ch): b for b, ch in _BYTE_SPELLING.items()}


def _byte_level_bytes(token: str) -> bytes:
    """Like tokenizers' ByteLevel decoder: a token spelled in the alphabet is bytes; anything else is raw text."""
    if _ALPHABET.issuperset(token):
        return token.translate(_UNSPELL).encode("latin-1")
    return token.encode("utf-8")


def _spell_bytes(text: str) -> str:
    return "".join(_BYTE_SPELLING[b] for b in text.encode("utf-8"))


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _sentencepiece_bytes(token: str) -> bytes:
    """Like the SentencePiece decoders: `<0xNN>` is one byte, ▁ is a space."""
    if len(token) == 6 and (m := _BYTE_TOKEN.fullmatch(token)):
        return bytes([int(m.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


# ---- GGUF -----------------------------------------------------------------------------------------------------

# llama.cpp's token types (gguf.TokenType).
def _set_post_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None, ids: dict[str, int]
) -> None:
    """What `encode(add_special_tokens=True)` adds, as transformers' `update_post_processor` builds it."""
    pieces = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = pieces + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    used = [(t, ids[t]) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(pieces), pair=" ".join(pair), special_tokens=used
    )


# ---- Hugging Face directory -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _decoder_types(decoder: Any) -> list[dict[str, Any]]:
    if not isinstance(decoder, dict):
        return []
    return [d for sub in decoder.get("decoders") or [] for d in _decoder_types(sub)] + [decoder]


def load_hf_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory: tokenizer.json, tokenizer_config.json, chat_template.jinja,
    additional_chat_templates/*.jinja, and config.json / generation_config.json for the end-of-sequence ids."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json (maxjax reads only the fast-tokenizer format)")
    source = path.read_text(encoding="utf-8")
    try:
        backend = tokenizers.Tokenizer.from_str(source)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"cannot load {path}: {e}") from e
    spec = json.loads(source)
    cfg = _read_json(model_dir / "tokenizer_config.json")
    model_cfg = _read_json(model_dir / "config.json")
    gen_cfg = _read_json(model_dir / "generation_config.json")

    vocab = backend.get_vocab(with_added_tokens=True)
    id_to_token = [""] * (max(vocab.values(), default=-1) + 1)
    for tok, i in vocab.items():
        id_to_token[i] = tok
    added = backend.get_added_tokens_decoder()
    special_ids = frozenset(i for i, t in added.items() if t.special)

    decoder_steps = _decoder_types(spec.get("decoder"))
    kinds = {d.get("type") for d in decoder_steps}
    strip = False
    if "ByteLevel" in kinds:
        token_bytes = [_byte_level_bytes(t) for t in id_to_token]
    elif kinds & {"ByteFallback", "Metaspace"} or any(
        d.get("pattern", {}).get("String") == "\u2581" for d in decoder_steps
    ):
        token_bytes = [_sentencepiece_bytes(t) for t in id_to_token]
        strip = any(
            d.get("type") == "Strip" and d.get("start", 0) >= 1 and d.get("content") == " "
            for d in decoder_steps
        )
        strip |= any(
            d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never"
            for d in decoder_steps
        )
    else:  # WordPiece, plain BPE, ...: per-token decoding is the best available spelling
        token_bytes = [
            backend.decode([i], skip_special_tokens=False).encode("utf-8") for i in range(len(id_to_token))
        ]

    strings = {name: _token_string(cfg.get(f"{name}_token")) for name in ("bos", "eos", "unk", "pad")}
    for name in ("bos", "eos", "pad"):
        ids = _id_list(model_cfg.get(f"{name}_token_id"))
        if strings[name] is None and ids and 0 <= ids[0] < len(id_to_token):
            strings[name] = id_to_token[ids[0]]
    bos_id = vocab.get(strings["bos"]) if strings["bos"] else None
    eos_ids = {vocab[strings["eos"]]} if strings["eos"] in vocab else set()
    eos_ids.update(_id_list(model_cfg.get("eos_token_id")), _id_list(gen_cfg.get("eos_token_id")))

    if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
        bos = strings["bos"] if cfg.get("add_bos_token") and bos_id is not None else None
        eos = strings["eos"] if cfg.get("add_eos_token") and strings["eos"] in vocab else None
        _set_post_processor(backend, bos, eos, vocab)
        add_bos = bos is not None
    else:  # tokenizer.json's own post-processor decides; see whether it adds BOS
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id

    return Tokenizer(
        backend,
        token_bytes=token_bytes,
        special_ids=special_ids,
        bos_token_id=bos_id,
        eos_token_ids=frozenset(eos_ids),
        add_bos_token=add_bos,
        chat_templates=_hf_chat_templates(model_dir, cfg),
        special_token_strings={f"{k}_token": v for k, v in strings.items() if v is not None},
        strip_leading_space=strip,
    )


def _hf_chat_templates(model_dir: Path, cfg: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; 'default' is the one used unless a request names another. The .jinja files win over
    tokenizer_config.json, as in transformers (they are where it saves templates now)."""
    templates: dict[str, str] = {}
    value = cfg.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):
        templates.update({t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t})
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        templates.update({p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))})
    return templates
