"""Request validation: every field's type and range, cross-field rules, and the error each bad value gets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from maxjax.serve.errors import ApiError
from maxjax.serve.schemas import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

VOCAB = 1000
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"messages": MESSAGES, **fields}, vocab_size=VOCAB)


def completion(**fields: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, {"prompt": "hi", **fields}, vocab_size=VOCAB)


def error_of(make: Any, **fields: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        make(**fields)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("temperature", "0.5"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 2.5),
        ("n", 0),
        ("n", MAX_N + 1),
        ("n", True),
        ("n", 1.5),
        ("max_tokens", 0),
        ("max_completion_tokens", 0),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("seed", 2**64),
        ("stream", "yes"),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("min_tokens", -1),
        ("stop_token_ids", [-1]),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"5": -100.5}),
    ],
)
def test_chat_field_ranges_name_the_field(field: str, value: Any) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    err = error_of(chat, **{field: value}, **extra)
    assert err.param == field, err.message


@pytest.mark.parametrize(("field", "value"), [("logprobs", 21), ("logprobs", -1), ("echo", 1), ("best_of", 0)])
def test_completion_field_ranges(field: str, value: Any) -> None:
    assert error_of(completion, **{field: value}).param == field


def test_good_values_pass_and_map_to_sampling_params() -> None:
    req = chat(
        temperature=0,
        top_p=0.5,
        n=3,
        stop="END",
        seed=7,
        presence_penalty=1,
        frequency_penalty=-1,
        logit_bias={"5": -100, "6": 100},
        top_k=-1,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=2,
        stop_token_ids=[9],
        ignore_eos=True,
        max_completion_tokens=20,
        max_tokens=5,
    )
    assert req.stop == ["END"] and req.requested_max_tokens == 20
    params = req.sampling_params(max_tokens=20, seed=8, logprobs=None)
    assert params.temperature == 0 and params.top_k == 0 and params.seed == 8
    assert params.logit_bias == {5: -100.0, 6: 100.0} and params.stop_token_ids == (9,)
    assert params.min_tokens == 2 and params.ignore_eos and params.repetition_penalty == 1.2


def test_defaults() -> None:
    params = chat().sampling_params(max_tokens=16, seed=None, logprobs=None)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_unknown_field_is_rejected_by_name() -> None:
    err = error_of(chat, max_token=5)
    assert err.param == "max_token" and "Unrecognized request argument" in err.message
    assert error_of(chat, stream=True, stream_options={"include_usage": True, "bogus": 1}).param == (
        "stream_options.bogus"
    )


def test_known_bookkeeping_fields_are_accepted() -> None:
    chat(user="u", metadata={"k": "v"}, store=False, service_tier="auto", parallel_tool_calls=False,
         reasoning_effort="low", prompt_cache_key="k", safety_identifier="s")  # fmt: skip


def test_missing_fields() -> None:
    with pytest.raises(ApiError) as info:
        parse_request(ChatCompletionRequest, {}, vocab_size=VOCAB)
    assert info.value.param == "messages" and "Missing required parameter" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_request(CompletionRequest, {}, vocab_size=VOCAB)
    assert info.value.param == "prompt"


def test_stop_forms() -> None:
    assert chat(stop=None).stop is None
    assert chat(stop=["a", "", "b"]).stop == ["a", "b"]
    assert error_of(chat, stop=["a", "b", "c", "d", "e"]).param == "stop"
    assert error_of(chat, stop=5).param == "stop"
    assert error_of(chat, stop=["a", 5]).param == "stop"


def test_messages() -> None:
    assert error_of(chat, messages=[]).param == "messages"
    assert error_of(chat, messages=[{"role": "robot", "content": "x"}]).param == "messages[0].role"
    assert error_of(chat, messages=[{"role": "user"}]).param == "messages[0].content"
    assert error_of(chat, messages="hi").param == "messages"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = chat(messages=[{"role": "developer", "content": "sys"}, {"role": "user", "content": parts}])
    assert req.messages[1].content == "a\nb"
    assert req.messages[0].template_dict() == {"role": "developer", "content": "sys"}
    for role in ("system", "assistant", "tool"):
        chat(messages=[{"role": role, "content": "x"}])
    chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])


def test_image_parts_keep_their_place_and_other_media_are_refused() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}},
             {"type": "refusal", "refusal": "b"}, {"type": "image_url", "image_url": "/pics/y.png"}]  # fmt: skip
    req = chat(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": parts}])
    assert req.messages[1].content == [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x"}},
        {"type": "text", "text": "b"}, {"type": "image_url", "image_url": {"url": "/pics/y.png"}},
    ]  # fmt: skip
    assert req.messages[1].template_dict()["content"] == [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}, {"type": "image"}]
    assert [(r.url, r.param) for r in req.image_refs()] == [("data:x", "messages[1].content[1]"),
                                                            ("/pics/y.png", "messages[1].content[3]")]  # fmt: skip
    assert chat().image_refs() == []

    def image_error(part: dict[str, Any], role: str = "user") -> ApiError:
        return error_of(chat, messages=[{"role": role, "content": [{"type": "text", "text": "a"}, part]}])

    err = image_error({"type": "image_url", "image_url": {"url": "data:x"}}, role="assistant")
    assert err.param == "messages[0].content" and "content[1]: image parts are only allowed in user messages" in err.message
    assert "must look like" in image_error({"type": "image_url", "image_url": {"url": ""}}).message
    assert "must look like" in image_error({"type": "image_url", "image_url": {"url": "x", "size": 1}}).message
    assert "must look like" in image_error({"type": "image_url", "image_url": 5}).message
    assert "detail" in image_error({"type": "image_url", "image_url": {"url": "x", "detail": "max"}}).message
    assert "image_url" in image_error({"type": "input_image", "image_url": "x"}).message
    audio = [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]
    assert "not supported" in error_of(chat, messages=[{"role": "user", "content": audio}]).message
    assert error_of(chat, messages=[{"role": "user", "content": [{"text": "no type"}]}]).param


def test_unsupported_features_say_so_and_tools_are_checked() -> None:
    assert "json_schema.schema" in error_of(chat, response_format={"type": "json_schema", "json_schema": {}}).message
    assert error_of(chat, response_format={"type": "yaml"}).param == "response_format"
    chat(response_format={"type": "text"})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    chat(tools=tools)
    chat(tools=tools, tool_choice="required")
    chat(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
    chat(tools=tools, tool_choice="none")
    assert error_of(chat, tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}).param == "tool_choice"
    assert error_of(chat, tools=[{"type": "code_interpreter"}]).param == "tools[0]"
    assert error_of(chat, tool_choice="required").param == "tool_choice"
    forced = error_of(chat, tools=tools, tool_choice="required", response_format={"type": "json_object"})
    assert forced.param == "tool_choice" and "send one" in forced.message
    assert error_of(chat, functions=[{"name": "f"}]).param == "functions"
    assert error_of(chat, modalities=["text", "audio"]).param == "modalities"
    assert error_of(completion, suffix="tail").param == "suffix"
    assert error_of(completion, best_of=3, n=2).param == "best_of"
    completion(best_of=2, n=2)


def test_cross_field_rules() -> None:
    assert error_of(chat, stream_options={"include_usage": True}).param == "stream_options"
    assert error_of(chat, stream=False, stream_options={"include_usage": True}).param == "stream_options"
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage
    assert error_of(chat, top_logprobs=2).param == "top_logprobs"
    assert error_of(chat, logit_bias={str(VOCAB): 1}).param == "logit_bias"
    assert error_of(chat, stop_token_ids=[VOCAB]).param == "stop_token_ids"
    assert error_of(chat, min_tokens=10, max_tokens=5).param == "min_tokens"
    assert error_of(completion, min_tokens=10, max_tokens=5).param == "min_tokens"


def test_prompt_forms() -> None:
    assert completion(prompt="a").prompt == ["a"]
    assert completion(prompt=["a", "b"]).prompt == ["a", "b"]
    assert completion(prompt=[1, 2, 3]).prompt == [[1, 2, 3]]
    assert completion(prompt=[[1, 2], [3]]).prompt == [[1, 2], [3]]
    for bad in ("", [], [""], [[]], [[1], []], [1, "a"], [True, 2], 5, None, [1.5]):
        assert error_of(completion, prompt=bad).param == "prompt", bad
    assert error_of(completion, prompt=[[1, VOCAB]]).param == "prompt"
    assert error_of(completion, prompt=[-1]).param == "prompt"


def test_response_format_and_structured_outputs_become_one_grammar() -> None:
    from maxjax.serve.grammar import GrammarSpec

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert chat(response_format={"type": "json_object"}).grammar_spec() == GrammarSpec.json_object()
    spec = chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
    assert spec.grammar_spec() == GrammarSpec.json_schema(schema, strict=True)
    assert chat(structured_outputs={"regex": "[0-9]+"}).grammar_spec() == GrammarSpec.regex("[0-9]+")
    assert completion(structured_outputs={"json": json.dumps(schema)}).grammar_spec() == GrammarSpec.json_schema(schema)
    assert chat(response_format={"type": "text"}).grammar_spec() is None
    both = chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"})
    with pytest.raises(ApiError, match="not both"):
        both.grammar_spec()
    assert error_of(chat, structured_outputs={"regex": "a", "json_object": True}).param == "structured_outputs"
