"""Constrained decoding (serve/grammar.py, graph/bitmask.py) with the real SmolLM2 vocabulary: a stand-in model
that picks random allowed tokens (seeded, leaning towards the tokens that close strings, arrays and objects so
that answers end) must always produce text that parses and validates, whatever path it takes through the mask;
bad constraints are GrammarErrors that say what is wrong; the mask rows follow the layout the graph unpacks."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from maxjax.graph.bitmask import apply_bitmask as jax_apply_bitmask
from maxjax.serve.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    Matcher,
    allowed_all,
    apply_bitmask,
)
from maxjax.serve.tool_use import HERMES, MISTRAL, ToolCallFormat, special_token_ids, tool_call_grammar
from maxjax.tokenizer import Tokenizer
from maxjax.tokenizer_gguf import load_gguf_tokenizer
from maxjax.weights.gguf import read_metadata

PADDING = 40
"""Extra model vocabulary past the tokenizer's, as padded embeddings have."""


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return load_gguf_tokenizer(read_metadata(smollm2_gguf))


@pytest.fixture(scope="module")
def compiler(tok: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tok, vocab_size=tok.vocab_size + PADDING)


def allowed_ids(compiler: GrammarCompiler, matcher: Matcher) -> np.ndarray:
    out = np.zeros((2, compiler.words), np.int32)
    matcher.fill_bitmask(out, 1)
    assert not out[0].any()
    return np.flatnonzero(np.unpackbits(out[1].view(np.uint8), bitorder="little"))


@functools.cache
def leaning(compiler: GrammarCompiler, tok: Tokenizer) -> np.ndarray:
    """[vocab] scores added to the stand-in model's noise: +5 for EOS and for tokens that can close something."""
    closers = np.array([any(c in tok.token_bytes(i) for c in b'"]},') for i in range(compiler.vocab_size)])
    lean = np.where(closers, 5.0, 0.0)
    lean[sorted(compiler.eos_token_ids)] = 5.0
    return lean


def generate(compiler: GrammarCompiler, tok: Tokenizer, matcher: Matcher, seed: int, limit: int = 600) -> str:
    """Sample allowed tokens until the grammar is finished; the text before EOS."""
    lean = leaning(compiler, tok)
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for _ in range(limit):
        allowed = allowed_ids(compiler, matcher)
        assert allowed.size and allowed.max() < tok.vocab_size  # never a padding id
        token = int(allowed[np.argmax(lean[allowed] + rng.gumbel(size=allowed.size))])
        assert matcher.advance(token), matcher.error
        if token in compiler.eos_token_ids:
            assert matcher.is_finished()
            return tok.decode(ids)
        ids.append(token)
    raise AssertionError(f"no end after {limit} tokens: {tok.decode(ids)!r}")


def answer(compiler: GrammarCompiler, tok: Tokenizer, spec: GrammarSpec, seed: int) -> str:
    return generate(compiler, tok, compiler.compile(spec), seed)


class Color(StrEnum):
    red = "red"
    green = "green"


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["cat", "dog", "fish"]
    age: int | None = None


class Owner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    favorite: Color
    score: float
    tags: list[str]
    pets: list[Pet]
    nickname: str | None = None


def test_json_schema_answers_validate(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    spec = GrammarSpec.json_schema(Owner.model_json_schema(), strict=True)
    for seed in range(4):
        text = answer(compiler, tok, spec, seed)
        Owner.model_validate_json(text)  # extra="forbid": strict kept every object closed
        assert ": " in text and "\n" not in text  # the one-line layout


def test_strict_closes_objects_and_leaves_data_alone(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    """A property named "properties" is not mistaken for the keyword; `enum` values are not schemas."""
    schema = {"type": "object", "required": ["properties", "mode"], "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
        "mode": {"enum": [{"type": "object", "properties": {}}, "plain"]}}}  # fmt: skip
    for seed in range(3):
        obj = json.loads(answer(compiler, tok, GrammarSpec.json_schema(schema, strict=True), seed))
        assert set(obj) == {"properties", "mode"} and set(obj["properties"]) == {"x"}
        assert obj["mode"] in ({"type": "object", "properties": {}}, "plain")


def test_json_object_answers_parse(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    for seed in range(3):
        assert isinstance(json.loads(answer(compiler, tok, GrammarSpec.json_object(), seed)), dict)


@pytest.mark.parametrize("pattern", [r"(yes|no), [0-9]{3}-[A-Z]{2}", r"\d{4}-\d{2}-\d{2}( [a-z]+)?"])
def test_regex_answers_match(compiler: GrammarCompiler, tok: Tokenizer, pattern: str) -> None:
    for seed in range(3):
        text = answer(compiler, tok, GrammarSpec.regex(pattern), seed)
        assert re.fullmatch(pattern, text), text


def test_lark_answers_match(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    grammar = 'start: "(" NUMBER (" + " NUMBER)* ")"\nNUMBER: /[1-9][0-9]{0,3}/'
    for seed in range(3):
        text = answer(compiler, tok, GrammarSpec.lark(grammar), seed)
        assert re.fullmatch(r"\([1-9][0-9]{0,3}( \+ [1-9][0-9]{0,3})*\)", text), text


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: int | None = None


class Search(BaseModel):
    query: str
    limit: int


TOOLS: list[dict[str, Any]] = [
    {"type": "function",
     "function": {"name": "get_weather", "parameters": Weather.model_json_schema(), "strict": True}},
    {"type": "function",
     "function": {"name": "search", "description": "web", "parameters": Search.model_json_schema()}},
    {"type": "function", "function": {"name": "now"}},
]  # fmt: skip
ARGUMENTS = {"get_weather": Weather, "search": Search}


def tool_spec(compiler: GrammarCompiler, tools: Any, choice: Any, **kwargs: Any) -> GrammarSpec:
    return tool_call_grammar(tools, choice, special_tokens=special_token_ids(compiler.tokenizer), **kwargs)


def hermes_calls(text: str) -> list[dict[str, object]]:
    blocks = re.fullmatch(r"<tool_call>\n.*?\n</tool_call>(\n<tool_call>\n.*?\n</tool_call>)*", text, re.S)
    assert blocks, text
    return [json.loads(body) for body in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.S)]


def test_required_tool_calls_parse_and_validate(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    spec = tool_spec(compiler, TOOLS, "required", call_format=HERMES)
    for seed in range(4):
        for call in hermes_calls(answer(compiler, tok, spec, seed)):
            assert set(call) == {"name", "arguments"}
            name, arguments = call["name"], call["arguments"]
            if name == "now":
                assert arguments == {}
            else:
                ARGUMENTS[str(name)].model_validate(arguments)


def test_named_tool_call_is_that_function_once(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    spec = tool_spec(compiler, TOOLS, choice, call_format=HERMES, parallel=False)
    for seed in range(3):
        [call] = hermes_calls(answer(compiler, tok, spec, seed))
        assert call["name"] == "get_weather"
        Weather.model_validate(call["arguments"])


def test_tool_call_formats(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    """Mistral's list (its marker spelled as text: SmolLM2 has no such token) and a marker that is a special
    token of the vocabulary, which the grammar asks for as that token."""
    text = answer(compiler, tok, tool_spec(compiler, TOOLS[:1], "required", call_format=MISTRAL), 0)
    assert text.startswith("[TOOL_CALLS][")
    for call in json.loads(text.removeprefix("[TOOL_CALLS]")):
        Weather.model_validate(call["arguments"])
    marked = tool_spec(compiler, TOOLS[:1], "required", call_format=ToolCallFormat(prefix="<|im_start|>"))
    assert allowed_ids(compiler, compiler.compile(marked)).tolist() == tok.encode("<|im_start|>")


@pytest.mark.parametrize(("spec", "message"), [
    (lambda: GrammarSpec.json_schema({"type": "wibble"}), "Invalid type: wibble"),
    (lambda: GrammarSpec.json_schema({"type": "string", "not": {"const": "x"}}), 'Unimplemented keys: ["not"]'),
    (lambda: GrammarSpec.json_schema({"$ref": "#/$defs/Missing"}), "Missing"),
    (lambda: GrammarSpec.json_schema({"type": "string", "format": "colour"}), "Unknown format: colour"),
    (lambda: GrammarSpec.json_schema(["not", "an", "object"]), "must be a JSON object"),  # type: ignore[arg-type]
    (lambda: GrammarSpec.regex("(ab"), "unclosed group"),
    (lambda: GrammarSpec.regex("a{2"), "regex"),
    (lambda: GrammarSpec.lark("start: missing_rule"), 'unknown name: "missing_rule"'),
])  # fmt: skip
def test_bad_constraints_raise_grammar_errors(
    compiler: GrammarCompiler, spec: Callable[[], GrammarSpec], message: str
) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)) as caught:
        compiler.compile(spec())
    assert isinstance(caught.value, ValueError) and "<state>" not in str(caught.value)


@pytest.mark.parametrize(("tools", "choice", "message", "param"), [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "'nope', which is not among", "tool_choice"),
    (TOOLS, "auto", "not enforced by a grammar", "tool_choice"),
    ([], "required", "at least one tool", "tools"),
    ([TOOLS[0], TOOLS[0]], "required", "defined twice", "tools[1]"),
    ([{"type": "function", "function": {"parameters": {}}}], "required", "name must be", "tools[0]"),
])  # fmt: skip
def test_bad_tools_raise_grammar_errors(
    compiler: GrammarCompiler, tools: list[dict[str, Any]], choice: Any, message: str, param: str
) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)) as caught:
        tool_spec(compiler, tools, choice)
    assert caught.value.param == param


def test_bad_tool_parameters_name_the_tool(compiler: GrammarCompiler) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    message = 'tools[1].function.parameters: Unimplemented keys: ["not"]'
    with pytest.raises(GrammarError, match=re.escape(message)):
        tool_spec(compiler, [TOOLS[0], bad], "required")
    with pytest.raises(GrammarError, match=re.escape(message)):
        tool_spec(compiler, [TOOLS[0], bad], {"type": "function", "function": {"name": "f"}})


def test_eos_only_when_complete_and_alone_when_finished(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    [eos] = compiler.eos_token_ids
    m = compiler.compile(GrammarSpec.regex("a+"))
    assert eos not in allowed_ids(compiler, m) and not m.accepts_eos
    assert m.advance(tok.encode("a")[0]) and m.accepts_eos and not m.is_finished()
    assert eos in allowed_ids(compiler, m)  # complete, and more a's may follow
    m = compiler.compile(GrammarSpec.regex("ab"))
    for t in tok.encode("ab"):
        assert m.advance(t)
    assert m.is_finished() and allowed_ids(compiler, m).tolist() == [eos]
    assert m.advance(eos) and m.is_finished()


def test_a_token_the_grammar_forbids(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    m = compiler.compile(GrammarSpec.regex("ab"))
    assert not m.advance(tok.encode(" properly")[0])
    assert "doesn't satisfy the grammar" in m.error and not m.is_finished() and not m.accepts_eos
    assert allowed_ids(compiler, m).tolist() == sorted(compiler.eos_token_ids)  # the row ends
    assert not compiler.compile(GrammarSpec.regex("ab")).advance(tok.vocab_size + 3)  # a padding id


def test_matchers_are_independent_and_batch_fill_agrees(compiler: GrammarCompiler, tok: Tokenizer) -> None:
    spec = GrammarSpec.json_schema(Owner.model_json_schema())
    a, b = compiler.compile(spec), compiler.compile(spec)
    for t in tok.encode('{"name": "Al'):
        assert a.advance(t)
    one = np.zeros((3, compiler.words), np.int32)
    a.fill_bitmask(one, 0)
    b.fill_bitmask(one, 2)
    both = np.full((3, compiler.words), 7, np.int32)
    both[1] = 0
    compiler.fill_bitmasks([(a, 0), (b, 2)], both)
    np.testing.assert_array_equal(one, both)
    assert not np.array_equal(one[0], one[2])


def test_allowed_all_and_numpy_apply_bitmask() -> None:
    row = allowed_all(40)
    assert row.dtype == np.int32 and row.tolist() == [-1, 0xFF]
    assert allowed_all(64).tolist() == [-1, -1]
    logits = np.arange(40, dtype=np.float32)
    mask = np.array([1 << 3 | 1 << 31, 1 << 7], np.uint32).view(np.int32)  # tokens 3, 31 and 39
    out = apply_bitmask(logits, mask)
    assert np.flatnonzero(np.isfinite(out)).tolist() == [3, 31, 39] and out[39] == 39
    np.testing.assert_array_equal(apply_bitmask(logits, row), logits)


def test_jax_apply_bitmask_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for vocab, words in [(40, 2), (100, 5), (64, 2)]:  # a partial last word, a wider mask, an exact fit
        logits = rng.normal(size=(3, vocab)).astype(np.float32)
        mask = rng.integers(-(2**31), 2**31, size=(3, words), dtype=np.int64).astype(np.int32)
        mask[2] = allowed_all(words * 32)
        got = np.asarray(jax.jit(jax_apply_bitmask)(logits, mask))
        np.testing.assert_array_equal(got, apply_bitmask(logits, mask))
        np.testing.assert_array_equal(got[2], logits[2])
    with pytest.raises(ValueError, match="covers 32 tokens"):
        jax_apply_bitmask(np.zeros((1, 40), np.float32), np.zeros((1, 1), np.int32))
