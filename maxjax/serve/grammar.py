"""Constrained decoding: a request's grammar as a per-step mask of the tokens it allows, built with llguidance.

A request that asks for structure carries a `GrammarSpec`: any JSON object, a JSON schema (`strict` or not), a
regex the whole answer matches, a Lark grammar, or a forced tool call (`GrammarCompiler.tool_call_spec`). The
`GrammarCompiler`, one per tokenizer, turns a spec into a `Matcher` for that request; compiling a new spec takes
a millisecond or two (llguidance builds its lexer lazily), compiled specs are kept (LRU) and a new request gets a
copy of the kept matcher in microseconds. A spec the engine cannot enforce (invalid, or using JSON-schema keywords
llguidance does not implement) raises `GrammarError`, a ValueError whose message names what is wrong: a 400, never
a silently unconstrained answer. docs/grammar-choice.md measures llguidance against xgrammar.

Each step, `Matcher.fill_bitmask` writes the allowed tokens as a packed row of int32 words (bit t % 32 of word
t // 32 set = token t allowed) into the step's [rows, ceil(vocab / 32)] array, and after sampling
`Matcher.advance(token)` moves the grammar on. End of sequence: while the grammar is incomplete EOS is masked
out; once it is complete EOS is allowed (`accepts_eos`), and once nothing but EOS can follow (`is_finished()`)
the mask allows only the tokenizer's EOS ids, so the row samples EOS and ends as any request does; `request.check_stop`
ends it at once (finish_reason "stop") without spending that step. The model's vocabulary may be wider
than the tokenizer's: the ids past the tokenizer are never allowed.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import numpy as np

from maxjax.tokenizer import Tokenizer

GrammarKind = Literal["json_object", "json_schema", "regex", "lark"]

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained JSON is laid out: one line, `", "` between items and `": "` after keys, as models write it.
Free whitespace lets a small model fill its budget with newlines and never close the object."""

_JSON_OPTIONS = {**JSON_LAYOUT, "lenient": False}
"""llguidance's JSON options for every schema: `lenient: False` makes keywords it does not implement an error
instead of being ignored."""
_KIND_NAMES = {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex",
               "lark": "Lark grammar"}  # fmt: skip


class GrammarError(ValueError):
    """A constraint that cannot be enforced: invalid or unsupported. `param` names the request field at fault,
    where the caller said it (e.g. `response_format.json_schema.schema`)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's answer must match; hashable, so it is its own key in the compiled-grammar cache.
    Build one with the class methods."""

    kind: GrammarKind
    source: str = ""
    """The JSON schema as JSON text (key order kept: llguidance emits properties in schema order), the regex,
    or the Lark grammar; empty for json_object."""
    strict: bool = False
    """json_schema only: objects without `additionalProperties` get none (OpenAI's strict mode), rather than
    JSON Schema's default of any."""

    @classmethod
    def json_object(cls) -> GrammarSpec:
        """Any JSON object (`response_format: {"type": "json_object"}`)."""
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], *, strict: bool = False) -> GrammarSpec:
        """Answers valid under `schema` (`response_format: {"type": "json_schema", ...}`)."""
        if not isinstance(schema, Mapping):
            raise GrammarError(f"a JSON schema must be a JSON object, not {type(schema).__name__}")
        try:
            text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise GrammarError(f"the JSON schema is not JSON: {err}") from None
        return cls("json_schema", text, strict)

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        """The whole answer matches `pattern` (anchored at both ends; Rust `regex` syntax, which is Python's
        without lookaround or backreferences)."""
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> GrammarSpec:
        """A Lark grammar in llguidance's dialect (rule `start`; `%json {...}` inlines a schema; special tokens
        as `<|name|>` or `<[id]>`)."""
        return cls("lark", grammar)


def allowed_all(vocab_size: int) -> np.ndarray:
    """The mask row of an unconstrained request: [ceil(vocab_size / 32)] int32 with the bits of tokens
    0 .. vocab_size - 1 set (the last word's bits past the vocabulary clear)."""
    words = np.full(-(-vocab_size // 32), -1, np.int32)
    if tail := vocab_size % 32:
        words[-1] = (1 << tail) - 1
    return words


def apply_bitmask(logits: np.ndarray, mask_row: np.ndarray) -> np.ndarray:
    """A copy of logits [..., V] with the tokens the packed mask [..., W] (W * 32 >= V) disallows set to -inf;
    the NumPy reference for `maxjax.graph.bitmask.apply_bitmask`."""
    vocab = logits.shape[-1]
    if mask_row.shape[-1] * 32 < vocab:
        words = mask_row.shape[-1]
        raise ValueError(f"a mask of {words} words covers {words * 32} tokens, not {vocab}")
    bits = (mask_row.astype(np.uint32)[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
    allowed = bits.reshape(*mask_row.shape[:-1], -1)[..., :vocab].astype(bool)
    return np.where(allowed, logits, -np.inf).astype(logits.dtype)


class Matcher:
    """One request's place in its grammar. Used by one thread at a time (the engine's); not copyable."""

    def __init__(self, inner: llguidance.LLMatcher, words: int) -> None:
        self._inner = inner
        self._words = words

    def fill_bitmask(self, out: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into `out[row]`, `out` a C-contiguous [rows, ceil(vocab / 32)] int32
        array. After a failed `advance` only EOS is allowed (llguidance's choice), so a row that slipped ends."""
        assert out.dtype == np.int32 and out.flags.c_contiguous and out.shape[1] == self._words, (
            f"mask array {out.dtype}{list(out.shape)} (contiguous: {out.flags.c_contiguous}); rows of "
            f"{self._words} int32 words expected"
        )
        target = out[row]
        self._inner.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)

    def advance(self, token_id: int) -> bool:
        """Move past `token_id`, the token sampled under this matcher's last mask. False when the grammar does
        not allow it (the matcher is then in error for good: `error` says why); True for EOS where the grammar is
        complete, after which the matcher is finished."""
        return bool(self._inner.consume_token(int(token_id)))

    @property
    def accepts_eos(self) -> bool:
        """The answer so far is complete: EOS is allowed next (more tokens may be too)."""
        return bool(self._inner.is_accepting()) and not self._inner.is_error()

    def is_finished(self) -> bool:
        """Nothing but EOS can follow (or EOS was taken): the answer is complete and the next mask allows only
        EOS. False for a matcher in error."""
        return bool(self._inner.is_stopped()) and not self._inner.is_error()

    @property
    def error(self) -> str:
        """Why the matcher is in error (a token the grammar did not allow); empty when it is not."""
        return str(self._inner.get_error())


class GrammarCompiler:
    """Turns `GrammarSpec`s into `Matcher`s for one tokenizer. Built once per model (wrapping the vocabulary
    costs about 0.2 s); `compile` may be called from any thread (llguidance releases the GIL while it builds).

    vocab_size: the model's vocabulary (the width of its logits), when wider than the tokenizer's.
    cache_size: compiled specs kept, least recently used dropped first.
    """

    def __init__(self, tokenizer: Tokenizer, *, vocab_size: int | None = None, cache_size: int = 256) -> None:
        vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens: a "
                "grammar could require a token the model cannot produce; pass the model's vocabulary size"
            )
        if not tokenizer.eos_token_ids:
            raise ValueError("the tokenizer has no end-of-sequence token, so a constrained answer could not end")
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        """Width of a mask row in int32 words."""
        self.tokenizer = tokenizer
        self.eos_token_ids = tokenizer.eos_token_ids
        self._ll_tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size)), eos_token=sorted(self.eos_token_ids)
        )
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._executor = llguidance.LLExecutor()
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Matcher:
        """A fresh matcher for `spec`, at the start of the answer. Raises GrammarError."""
        with self._lock:
            pristine = self._cache.get(spec)
            if pristine is not None:
                self._cache.move_to_end(spec)
        if pristine is None:
            pristine = self._build(spec)
            with self._lock:
                self._cache[spec] = pristine
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return Matcher(pristine.deep_copy(), self.words)

    def fill_bitmasks(self, rows: Sequence[tuple[Matcher, int]], out: np.ndarray) -> None:
        """`fill_bitmask` for many (matcher, row) pairs at once, spread over llguidance's threads."""
        assert out.dtype == np.int32 and out.flags.c_contiguous and out.shape[1] == self.words, (
            f"mask array {out.dtype}{list(out.shape)}; rows of {self.words} int32 words expected"
        )
        pairs = [(m._inner, row) for m, row in rows]
        self._executor.unsafe_compute_mask_ptr(pairs, out.ctypes.data, self.words * 4, out.shape[0])

    def _build(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        if spec.kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text({"type": "object"}, strict=False))
        elif spec.kind == "json_schema":
            try:
                schema = json.loads(spec.source)
            except ValueError as err:
                raise GrammarError(f"the JSON schema is not JSON: {err}") from None
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text(schema, strict=spec.strict))
        elif spec.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.source)
        elif spec.kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec.source)
        else:
            raise GrammarError(f"unknown grammar kind {spec.kind!r} (known: {', '.join(_KIND_NAMES)})")
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            what = _KIND_NAMES[spec.kind]
            raise GrammarError(f"unsupported or invalid {what}: {error_text(matcher.get_error(), spec.kind)}")
        return matcher


class _Vocabulary:
    """The tokenizer as llguidance.TokenizerWrapper reads it: maxjax's own token bytes (so the grammar sees
    exactly the text `Tokenizer.decode` gives), special tokens unmatchable as text, and ids past the tokenizer
    up to the model's vocabulary as special placeholders no text can produce."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        n = tokenizer.vocab_size
        self._tokenizer = tokenizer
        self.eos_token_id = min(tokenizer.eos_token_ids)
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)]
        self.tokens += [f"<|maxjax_padding_{i}|>".encode() for i in range(n, vocab_size)]
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)] + list(range(n, vocab_size))

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"))


def schema_text(schema: Mapping[str, Any], *, strict: bool) -> str:
    """The schema as llguidance compiles it: our JSON options in its `x-guidance` (replacing any the client
    sent), objects closed when strict."""
    schema = _closed(schema) if strict else dict(schema)
    schema["x-guidance"] = _JSON_OPTIONS
    return json.dumps(schema, ensure_ascii=False)


# Keywords whose value is a schema, a list of schemas, or a map from names to schemas (JSON Schema 2020-12 and
# the draft-7 spellings pydantic and others still emit).
_ONE_SCHEMA = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")  # fmt: skip
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which every object schema without `additionalProperties` has it false (OpenAI's
    strict mode: only the listed properties). Walks schema keywords only, never data (`const`, `enum`,
    `default`), so a property that happens to be named "properties" is left alone."""
    out = dict(schema)
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _ONE_SCHEMA:
        if isinstance(out.get(key), Mapping):
            out[key] = _closed(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) if isinstance(s, Mapping) else s for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: _closed(s) if isinstance(s, Mapping) else s for k, s in out[key].items()}
    return out


def error_text(message: str, kind: GrammarKind) -> str:
    """llguidance's error without its state dump; for a regex also without the position in, and the echo of,
    the one-line Lark grammar llguidance wrapped it in (`at 1(8): ... 1 | start: /(ab/`)."""
    lines = message.split("<non-verbose/>")[0].split("\n<state>")[0].strip().splitlines()
    if kind == "regex":
        lines = [re.sub(r"^at \d+\(\d+\): ", "", line) for line in lines]
        lines = lines[: next((k for k, line in enumerate(lines) if re.match(r"\s+\d+ \| ", line)), len(lines))]
    limit = 8
    return "\n".join(lines[:limit]) + ("\n..." if len(lines) > limit else "")
