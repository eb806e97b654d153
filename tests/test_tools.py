"""Tools and reasoning in chat: what the template sees (a template that knows tools, and SmolLM2's, which does
not), forced calls against the real SmolLM2 server with the real `openai` client (their arguments valid only
because the grammar makes them so), a conversation that goes on after a tool result, and `reasoning_content`
with tool calls parsed from a scripted answer, streamed and whole."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState
from maxjax.serve.chat_answer import AnswerReader, read_answer
from maxjax.serve.fake_engine import FakeEngine
from maxjax.serve.grammar import GrammarError
from maxjax.serve.reasoning import get_reasoning_parser
from maxjax.serve.tool_parsers import get_tool_parser
from maxjax.serve.tool_use import ChatFeatures, ToolPlan, template_reads_tools
from maxjax.tokenizer import Tokenizer
from tests.serve_helpers import WORDS, RealServer, Server, load_tokenizer, running_server


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=16)
    unit: Literal["c", "f"]


class Add(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int = Field(ge=0, le=999)
    b: int = Field(ge=0, le=999)


SCHEMAS: dict[str, type[BaseModel]] = {"get_weather": Weather, "add": Add}
# The schemas written out short (the fallback prompt costs tokens); the models above check the answers.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"]}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# A ChatML template that knows tools, shaped as Qwen2.5's / Hermes' are.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 12}'},
]  # fmt: skip


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def features(tok: Tokenizer) -> ChatFeatures:
    return ChatFeatures.for_tokenizer(tok)


def plan(features: ChatFeatures, messages: list[dict[str, Any]], template: str | None, **kw: Any) -> ToolPlan:
    kw.setdefault("tools", TOOLS)
    kw.setdefault("tool_choice", "auto")
    return ToolPlan.make(messages, kw["tools"], kw["tool_choice"], parallel=True, template_source=template,
                         features=features)  # fmt: skip


def test_smollm2_template_gets_the_tools_in_a_system_message(tok: Tokenizer, features: ChatFeatures) -> None:
    assert features.tool_parser.name == "hermes"  # nothing in SmolLM2 points elsewhere
    assert tok.chat_template and not template_reads_tools(tok.chat_template)
    p = plan(features, HISTORY, tok.chat_template)
    assert p.template_tools is None and p.parser is not None and p.grammar is None
    text = tok.apply_chat_template(p.messages)
    assert text.startswith("<|im_start|>system\nYou can call functions")
    assert '"name": "get_weather"' in text and "<tool_call>" in text
    # The earlier call in the model's own format, the result as a user turn.
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 12}\n</tool_response><|im_end|>' in text
    # A client's own system message keeps its words, the tools follow.
    p = plan(features, [{"role": "system", "content": "Be brief."}, *ASK], tok.chat_template)
    assert p.messages[0]["content"].startswith("Be brief.\n\nYou can call functions")
    # tool_choice none: no tools described, but a history with calls still renders.
    p = plan(features, HISTORY, tok.chat_template, tool_choice="none")
    assert p.parser is None and "<tools>" not in tok.apply_chat_template(p.messages)


def test_a_template_that_knows_tools_gets_them_as_hf_passes_them(tok: Tokenizer, features: ChatFeatures) -> None:
    assert template_reads_tools(TOOL_TEMPLATE)
    p = plan(features, HISTORY, TOOL_TEMPLATE)
    assert p.template_tools == TOOLS
    # Arguments as an object (templates write them with tojson), not OpenAI's JSON text.
    assert p.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert HISTORY[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris", "unit": "c"}'  # untouched
    text = tok.apply_chat_template(p.messages, template=TOOL_TEMPLATE, tools=p.template_tools)
    assert '"arguments": {"city": "Paris", "unit": "c"}}' in text and '"name": "add"' in text


@pytest.mark.parametrize(("kw", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0]"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
])  # fmt: skip
def test_bad_tools_raise(features: ChatFeatures, kw: dict[str, Any], param: str) -> None:
    with pytest.raises(GrammarError) as caught:
        plan(features, ASK, None, **kw)
    assert caught.value.param == param


QWEN3_TOOL_ANSWER = (
    "<think>\nThe user wants the weather. I should call get_weather.\n</think>\n\n"
    "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}"
    "\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>"
)


def test_a_streamed_answer_adds_up_to_the_whole_one() -> None:
    reasoning, tools = get_reasoning_parser("qwen3"), get_tool_parser("hermes")
    message, reason = read_answer(QWEN3_TOOL_ANSWER, reasoning=reasoning, tools=tools, prompt="", finish_reason="stop")
    assert reason == "tool_calls"
    assert message["reasoning_content"] == "The user wants the weather. I should call get_weather."
    assert message["content"] == "Let me check."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "add"]
    rng = random.Random(0)
    for _ in range(20):
        reader = AnswerReader(reasoning=reasoning, tools=tools, prompt="")
        cuts = sorted(rng.sample(range(1, len(QWEN3_TOOL_ANSWER)), 12))
        deltas = [reader.feed(QWEN3_TOOL_ANSWER[a:b]) for a, b in zip([0, *cuts], [*cuts, None], strict=True)]
        tail, streamed_reason = reader.finish("stop")
        deltas.append(tail)
        assert streamed_reason == "tool_calls"
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
        assert "".join(d.get("content", "") for d in deltas) == message["content"]
        arguments: dict[int, str] = {}
        for entry in (e for d in deltas for e in d.get("tool_calls", [])):
            arguments[entry["index"]] = arguments.get(entry["index"], "") + entry["function"]["arguments"]
        assert [arguments[i] for i in sorted(arguments)] == [
            c["function"]["arguments"] for c in message["tool_calls"]
        ]
    # Without tools or a reasoning parser the text is the content, untouched.
    plain, reason = read_answer(QWEN3_TOOL_ANSWER, reasoning=None, tools=None, prompt="", finish_reason="length")
    assert plain["content"] == QWEN3_TOOL_ANSWER and plain["reasoning_content"] is None and reason == "length"


@pytest.fixture(scope="module")
def scripted(tok: Tokenizer) -> Iterator[Server]:
    """A server whose engine always answers QWEN3_TOOL_ANSWER, with the qwen3 reasoning parser."""
    answer = tok.encode(QWEN3_TOOL_ANSWER)
    engine = FakeEngine(tok.encode(WORDS), eos_token_id=min(tok.eos_token_ids), model_name="m", max_model_len=1024,
                        answer=answer, eos_after=len(answer))  # fmt: skip
    state = ServingState(model_name="m")
    state.set_ready(engine, tok)
    with running_server(state, ServerConfig(host="127.0.0.1", port=0, reasoning_parser="qwen3")) as srv:
        yield srv


def test_reasoning_and_calls_over_http(scripted: Server) -> None:
    client = openai.OpenAI(base_url=scripted.base_url, api_key="x", max_retries=0, _strict_response_validation=True)
    reply = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert choice.message.model_extra and choice.message.model_extra["reasoning_content"].startswith("The user")
    calls = choice.message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris", "unit": "c"}, {"a": 1, "b": 2}]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)

    stream = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, stream=True)  # type: ignore[arg-type]
    reasoning, content, names, arguments, finish = "", "", {}, {}, []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id is not None:
                assert call.index not in names, "a call's id and name come once, first"
                names[call.index] = call.function.name if call.function else None
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "" if call.function else "")
        finish.append(chunk.choices[0].finish_reason)
    assert reasoning == choice.message.model_extra["reasoning_content"] and content == "Let me check."
    assert names == {0: "get_weather", 1: "add"}
    assert [arguments[0], arguments[1]] == [c.function.arguments for c in calls]
    assert finish[-1] == "tool_calls" and finish.count("tool_calls") == 1

    # The same answer without tools in the request: calls stay text, thinking is still split off.
    reply = client.chat.completions.create(model="m", messages=ASK)
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    assert (reply.choices[0].message.content or "").startswith("Let me check.\n<tool_call>")


@pytest.fixture(scope="module")
def server(real_server: RealServer) -> RealServer:
    return real_server


def _calls(message: Any) -> list[tuple[str, BaseModel]]:
    """The message's calls, each validated against its function's schema (raises when one is not valid)."""
    return [(c.function.name, SCHEMAS[c.function.name].model_validate_json(c.function.arguments))
            for c in message.tool_calls or []]  # fmt: skip


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls_always_validate(server: RealServer, choice: Any) -> None:
    client = server.client()
    for seed in range(3):
        reply = client.chat.completions.create(
            model="smollm2", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0.8, seed=seed,  # type: ignore[arg-type]
            max_tokens=40, parallel_tool_calls=False)
        [(name, _)] = _calls(reply.choices[0].message)
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert name == "add" or choice == "required"


def test_forced_calls_stream_name_first_then_arguments(server: RealServer) -> None:
    client = server.client()
    for seed in range(2):
        stream = client.chat.completions.create(
            model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed,  # type: ignore[arg-type]
            max_tokens=40, parallel_tool_calls=False, stream=True)
        names, pieces, finish = [], [], None
        for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or []:
                assert call.index == 0 and call.function is not None
                if call.id is not None:
                    names.append(call.function.name)
                    assert not pieces, "the name comes before any argument"
                pieces.append(call.function.arguments or "")
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and len(names) == 1 and len([p for p in pieces if p]) > 1
        SCHEMAS[str(names[0])].model_validate_json("".join(pieces))


def test_a_conversation_goes_on_after_a_tool_result(server: RealServer) -> None:
    client = server.client()
    first = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},  # type: ignore[arg-type]
        max_tokens=40, temperature=0.0, parallel_tool_calls=False)
    message = first.choices[0].message
    [(name, _)] = _calls(message)
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 12}'}]  # type: ignore[index]
    reply = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, max_tokens=24,  # type: ignore[arg-type]
                                           temperature=0.0)  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls
    assert reply.usage is not None and reply.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wibble"}}}],
      "tool_choice": "required"}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
])  # fmt: skip
def test_tools_that_cannot_be_served_are_a_400(server: RealServer, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="smollm2", messages=ASK, max_tokens=4, **body)
    error = caught.value.body
    assert isinstance(error, dict) and error.get("param") == param, error
