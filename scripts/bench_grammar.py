"""Measure the two grammar engines the server could use, llguidance and xgrammar, on a real tokenizer.

    .venv/bin/python scripts/bench_grammar.py [--model PATH.gguf] [--repeats 5]

For each engine that imports: the one-off cost of wrapping the tokenizer; the cost of compiling a JSON schema (a
nested pydantic model with enums, arrays, optional fields, `$ref`s) into a matcher, and of starting a second
matcher from it; then, walking the tokens of a valid answer (a few hundred), the time to compute the next-token
bitmask and the time to advance on the token. Both engines see the same vocabulary (maxjax's token bytes, special
tokens unmatchable as text) and the same JSON layout (no free whitespace, ", " and ": " separators).

xgrammar's Python package imports torch and transformers at the top (for its tensor helpers and its Hugging Face
adapter, neither used here); where they are not installed, stand-in modules are registered so that the engine
itself can be measured. To reproduce without installing torch, put xgrammar (`pip install --no-deps xgrammar
apache-tvm-ffi`) in a scratch virtual environment that also sees this project's packages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from enum import StrEnum
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from maxjax.fetch import default_model_path
from maxjax.tokenizer import Tokenizer
from maxjax.tokenizer_gguf import load_gguf_tokenizer
from maxjax.weights.gguf import read_metadata


class Color(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Closed(BaseModel):
    """Objects without extra keys (`additionalProperties: false`), as OpenAI's strict mode has them: llguidance
    follows JSON Schema (extra keys allowed unless the schema says not), xgrammar closes objects by default."""

    model_config = ConfigDict(extra="forbid")


class Address(Closed):
    street: str
    city: str
    postcode: str | None = None
    country: Literal["NL", "FR", "DE", "US"]


class Pet(Closed):
    name: str
    kind: Literal["cat", "dog", "fish", "bird"]
    age: int | None = None
    vaccinated: bool


class Person(Closed):
    name: str
    age: int
    email: str | None = None
    favorite_color: Color
    height_m: float
    tags: list[str]
    address: Address
    previous_addresses: list[Address] = []
    pets: list[Pet]
    nickname: str | None = None


def example_answer() -> str:
    """A valid Person as JSON, laid out as both grammars require, a few hundred tokens long."""
    home = {"street": "12 Canal Street", "city": "Amsterdam", "postcode": "1012 AB", "country": "NL"}
    person = Person.model_validate({
        "name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "favorite_color": "green", "height_m": 1.65,
        "tags": ["mathematician", "writer", "analyst", "poet of science", "translator", "correspondent"],
        "address": home,
        "previous_addresses": [
            {"street": "St James's Square", "city": "London", "country": "US"},
            {"street": "Rue de Rivoli 4", "city": "Paris", "postcode": "75004", "country": "FR"},
            {"street": "Unter den Linden 1", "city": "Berlin", "country": "DE"}],
        "pets": [{"name": "Puff", "kind": "cat", "age": 4, "vaccinated": True},
                 {"name": "Rex", "kind": "dog", "vaccinated": False},
                 {"name": "Bubbles", "kind": "fish", "age": 1, "vaccinated": False},
                 {"name": "Kiwi", "kind": "bird", "age": 2, "vaccinated": True}],
        "nickname": "The Enchantress of Numbers",
    })  # fmt: skip
    return json.dumps(person.model_dump(mode="json", exclude_defaults=False), separators=(", ", ": "))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeats)) * 1e3


def walk(
    fill: Callable[[], Any], advance: Callable[[int], bool], mask: np.ndarray, ids: list[int]
) -> dict[str, list[Any]]:
    """Per-token seconds to fill the mask and to advance over the answer's tokens, and each step's mask (copied
    outside the timings)."""
    fills, advances, allowed = [], [], []
    for tok in ids:
        fills.append(timed(fill)[0])
        allowed.append(mask.reshape(-1).copy())
        dt, ok = timed(lambda tok=tok: advance(tok))
        assert ok, f"token {tok} rejected"
        advances.append(dt)
    return {"fills": fills, "advances": advances, "allowed": allowed}


def bench_llguidance(tok: Tokenizer, schema: dict[str, Any], ids: list[int], repeats: int) -> dict[str, Any]:
    import llguidance

    class Vocabulary:  # what llguidance.TokenizerWrapper reads
        eos_token_id = min(tok.eos_token_ids)
        bos_token_id = tok.bos_token_id
        tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        special_token_ids = [i for i in range(tok.vocab_size) if tok.is_special(i)]

        def __call__(self, text: bytes) -> list[int]:
            return tok.encode(text.decode("utf-8", errors="replace"))

    wrap_s, ll_tok = timed(lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()),
                                                          eos_token=sorted(tok.eos_token_ids)))
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile_schema() -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    compile_ms = median_ms(compile_schema, repeats)
    pristine = compile_schema()
    copy_ms = median_ms(pristine.deep_copy, repeats)
    matcher = pristine.deep_copy()
    mask = np.zeros(-(-tok.vocab_size // 32), np.int32)
    steps = walk(lambda: matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes),
                 matcher.consume_token, mask, ids)
    return {"engine": f"llguidance {llguidance.__version__}", "wrap_ms": wrap_s * 1e3, "compile_ms": compile_ms,
            "copy_ms": copy_ms, **steps}


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ModuleNotFoundError as err:
        if err.name not in ("torch", "transformers"):
            raise
        import tvm_ffi  # noqa: F401  (imported first: it probes for a real torch and must not find the stand-in)

        class StandIn(types.ModuleType):
            def __getattr__(self, name: str) -> Any:
                if name.startswith("__"):
                    raise AttributeError(name)
                return type(name, (), {})

        torch = StandIn("torch")
        torch.int32 = "int32"  # type: ignore[attr-defined]
        torch.tensor = lambda value, dtype=None: value  # type: ignore[attr-defined]
        sys.modules.setdefault("torch", torch)
        sys.modules.setdefault("transformers", StandIn("transformers"))
        import xgrammar
    return xgrammar


def bench_xgrammar(tok: Tokenizer, schema: dict[str, Any], ids: list[int], repeats: int) -> dict[str, Any]:
    xgr = import_xgrammar()
    # Special tokens as empty strings: xgrammar then never matches them as text (it would match "<|im_end|>").
    vocab = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
    wrap_s, info = timed(lambda: xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                                   stop_token_ids=sorted(tok.eos_token_ids)))
    text = json.dumps(schema)

    def compile_schema() -> Any:
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(", ", ": "))
        return xgr.GrammarMatcher(compiled)

    compile_ms = median_ms(compile_schema, repeats)
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
        text, any_whitespace=False, separators=(", ", ": "))
    copy_ms = median_ms(lambda: xgr.GrammarMatcher(compiled), repeats)
    matcher = xgr.GrammarMatcher(compiled)
    mask = np.zeros((1, -(-tok.vocab_size // 32)), np.int32)
    steps = walk(lambda: matcher.fill_next_token_bitmask(mask, 0), matcher.accept_token, mask, ids)
    return {"engine": f"xgrammar {version('xgrammar')}", "wrap_ms": wrap_s * 1e3, "compile_ms": compile_ms,
            "copy_ms": copy_ms, **steps}


def bench_batch(tok: Tokenizer, schema: dict[str, Any], ids: list[int], rows: int = 16, steps: int = 60) -> str:
    """maxjax's own wrapper (llguidance): `rows` requests at different points of the answer, all masks of a
    step filled one row at a time and with `fill_bitmasks`; median ms per step."""
    from maxjax.serve.grammar import GrammarCompiler, GrammarSpec

    compiler = GrammarCompiler(tok)
    matchers = [compiler.compile(GrammarSpec.json_schema(schema)) for _ in range(rows)]
    stride = (len(ids) - steps - 1) // rows
    for k, m in enumerate(matchers):
        assert all(m.advance(t) for t in ids[: stride * k])
    out = np.zeros((rows, compiler.words), np.int32)
    one_by_one, together = [], []
    for step in range(steps):
        one_by_one.append(timed(lambda: [m.fill_bitmask(out, r) for r, m in enumerate(matchers)])[0])
        together.append(timed(lambda: compiler.fill_bitmasks(list(zip(matchers, range(rows), strict=True)), out))[0])
        for k, m in enumerate(matchers):
            assert m.advance(ids[stride * k + step])
    return (f"batch {rows}, maxjax.serve.grammar: {statistics.median(one_by_one) * 1e3:.2f} ms a step one row at a "
            f"time, {statistics.median(together) * 1e3:.2f} ms with fill_bitmasks")


def micro(values: list[float]) -> str:
    us = np.asarray(values) * 1e6
    return f"{np.median(us):7.1f} {us.mean():7.1f} {np.percentile(us, 99):7.1f} {us.max():8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the cached SmolLM2)")
    parser.add_argument("--repeats", type=int, default=5, help="compiles timed per engine (median reported)")
    args = parser.parse_args()
    tok = load_gguf_tokenizer(read_metadata(args.model or default_model_path(fetch=False)))
    schema = Person.model_json_schema()
    answer = example_answer()
    Person.model_validate_json(answer)
    ids = tok.encode(answer) + sorted(tok.eos_token_ids)[:1]
    print(f"vocabulary {tok.vocab_size}; answer {len(answer)} characters, {len(ids)} tokens (EOS included)")

    results = []
    for bench in (bench_llguidance, bench_xgrammar):
        try:
            results.append(bench(tok, schema, ids, args.repeats))
        except ImportError as err:
            print(f"{bench.__name__}: not importable ({err})")
    print(f"\n{'engine':18} {'wrap tokenizer':>15} {'compile schema':>15} {'new matcher':>12}  (ms, median)")
    for r in results:
        print(f"{r['engine']:18} {r['wrap_ms']:15.1f} {r['compile_ms']:15.1f} {r['copy_ms']:12.3f}")
    print(f"\n{'engine':18} {'step':8} {'median':>7} {'mean':>7} {'p99':>7} {'max':>8}  (µs per token)")
    for r in results:
        print(f"{r['engine']:18} {'mask':8} {micro(r['fills'])}")
        print(f"{'':18} {'advance':8} {micro(r['advances'])}")
        print(f"{'':18} {'1st mask':8} {r['fills'][0] * 1e6:7.1f}")
    print(f"\n{bench_batch(tok, schema, ids)}")
    if len(results) == 2:
        a, b = (np.stack(r["allowed"]).view(np.uint32) for r in results)
        differ = int((a != b).any(axis=1).sum())
        only = [int(np.unpackbits((x & ~y).view(np.uint8)).sum()) for x, y in ((a, b), (b, a))]
        print(f"\nallowed sets differ at {differ} of {len(a)} steps; token-steps allowed by {results[0]['engine']} "
              f"only: {only[0]}, by {results[1]['engine']} only: {only[1]}")


if __name__ == "__main__":
    main()
