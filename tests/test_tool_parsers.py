"""Tool-call parsers on each family's output format as its chat template and documentation show it: whole
answers, and the same answers streamed one character at a time and in random cuts."""

from __future__ import annotations

import json
import random

import pytest

from maxjax.serve.tool_parsers import (
    TOOL_PARSERS,
    ContentDelta,
    StreamEvent,
    ToolCall,
    ToolCallDelta,
    chat_delta,
    detect_tool_parser,
    get_tool_parser,
    tool_finish_reason,
)

SF = {"location": "San Francisco, CA, USA", "unit": "celsius"}
SF_DATE = {"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"}
EVENT = {
    "title": "Réunion à Zürich – 東京 📅",
    "attendees": [{"name": "Zoë", "email": "zoe@example.com"}, {"name": "Ömer", "email": None}],
    "when": {"start": "2025-03-01T09:00:00+01:00", "duration_minutes": 45, "tz_offset": -1.5e0},
    "remind": True,
}

# Qwen2.5 / Qwen3 / Hermes: what the template's tool prompt asks for ("For each function call, return a json
# object with function name and arguments within <tool_call></tool_call> XML tags").
QWEN_ONE = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": '
    '{"location": "San Francisco, CA, USA", "unit": "celsius"}}\n</tool_call>'
)
QWEN_TWO = (
    QWEN_ONE + '\n<tool_call>\n{"name": "get_temperature_date", "arguments": '
    '{"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"}}\n</tool_call>'
)
# Hermes 2 Pro's model card shows the arguments first.
HERMES_PRO = '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n</tool_call>'
UNICODE_CALL = (
    '<tool_call>\n{"name": "create_event", "arguments": '
    + json.dumps(EVENT, ensure_ascii=False, indent=2)
    + "}\n</tool_call>"
)

# Llama 3.1 / 3.2 / 3.3: "Respond in the format {"name": function name, "parameters": dictionary of argument
# name and its value}" (the model card's JSON-based tool calling).
LLAMA_ONE = '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}'
LLAMA_TWO = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": {"city": "London"}}'

# Mistral 7B v0.3 ([TOOL_CALLS] then a JSON list), Nemo (ids of 9 letters and digits, no space), and the
# newer tokenizers' [TOOL_CALLS]name[ARGS]{...}.
MISTRAL_V3 = '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}]'
MISTRAL_NEMO = (
    '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}, '
    '"id": "a1b2c3d4e"}, {"name": "get_current_weather", "arguments": {"location": "Lyon, France", "format": '
    '"celsius"}, "id": "f5g6h7i8j"}]'
)
MISTRAL_ARGS = '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", "format": "celsius"}'

PARIS = {"location": "Paris, France", "format": "celsius"}
LYON = {"location": "Lyon, France", "format": "celsius"}

# (parser, text, content, [(name, arguments as an object)])
WELL_FORMED = [
    ("hermes", QWEN_ONE, None, [("get_current_temperature", SF)]),
    ("hermes", QWEN_TWO, None, [("get_current_temperature", SF), ("get_temperature_date", SF_DATE)]),
    (
        "hermes",
        "I'll look up the current temperature in San Francisco first.\n\n" + QWEN_ONE,
        "I'll look up the current temperature in San Francisco first.",
        [("get_current_temperature", SF)],
    ),
    (
        "hermes",
        QWEN_ONE + "\n\nI will report back once I have the reading.\n",
        "I will report back once I have the reading.\n",
        [("get_current_temperature", SF)],
    ),
    ("hermes", HERMES_PRO, None, [("get_stock_fundamentals", {"symbol": "TSLA"})]),
    ("hermes", UNICODE_CALL, None, [("create_event", EVENT)]),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {}}\n', None, [("get_time", {})]),
    ("hermes", '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", {})]),
    (
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}\n</tool_call>',
        None,
        [("f", {"a": [1, 2]})],
    ),
    (
        "llama3_json",
        LLAMA_ONE,
        None,
        [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
    ),
    (
        "llama3_json",
        "<|python_tag|>" + LLAMA_ONE,
        None,
        [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
    ),
    (
        "llama3_json",
        "\n\n" + LLAMA_TWO,
        None,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})],
    ),
    (
        "llama3_json",
        '{"type": "function", "name": "search", "arguments": {"query": "llama 3.2 release date"}}\n'
        '{"type": "function", "name": "search", "arguments": {"query": "llama 3.3 release date"}}',
        None,
        [("search", {"query": "llama 3.2 release date"}), ("search", {"query": "llama 3.3 release date"})],
    ),
    (
        "llama3_json",
        "Let me search for that. <|python_tag|>" + LLAMA_ONE,
        "Let me search for that.",
        [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
    ),
    ("mistral", MISTRAL_V3, None, [("get_current_weather", PARIS)]),
    ("mistral", MISTRAL_NEMO, None, [("get_current_weather", PARIS), ("get_current_weather", LYON)]),
    ("mistral", MISTRAL_ARGS, None, [("get_current_weather", PARIS)]),
    (
        "mistral",
        "Let me check both cities."
        + MISTRAL_ARGS
        + '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Lyon, France", "format": "celsius"}',
        "Let me check both cities.",
        [("get_current_weather", PARIS), ("get_current_weather", LYON)],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_current_weather[CALL_ID]a1b2c3d4e[ARGS]{"location": "Paris, France", "format": "celsius"}',
        None,
        [("get_current_weather", PARIS)],
    ),
    (
        "mistral",
        "[TOOL_CALLS]" + json.dumps([{"name": "create_event", "arguments": EVENT}], ensure_ascii=False),
        None,
        [("create_event", EVENT)],
    ),
]

# Answers without a call, kept as written (markers cut short, braces in prose, JSON that is not a call).
PLAIN = [
    ("hermes", "The temperature in San Francisco is 22 °C.\n"),
    ("hermes", "Compare a < b, then <tool_ and <tool_call"),
    ("llama3_json", "  Use the format {name: value} in the config."),
    ("llama3_json", '{"city": "Paris", "temperature": 21}'),
    ("llama3_json", '<|python_tag|>brave_search.call(query="current weather in Menlo Park, California")'),
    ("mistral", "[TOOL_CALL] is not the marker; [TOOL_CALLS is cut"),
    ("mistral", "Paris is sunny today. 🌞"),
]

# Calls found broken before anything of them is sent: given back as text, streamed or not.
MALFORMED = [
    ("hermes", "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Paris'}}\n</tool_call>"),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>'),
    ("llama3_json", '{"name": 42, "parameters": {}}'),
    ("llama3_json", '{"parameters": {"x": NaN}, "name": "f"}'),
    ("mistral", '[TOOL_CALLS]get weather[ARGS]{"location": "Paris"}'),
    ("mistral", "[TOOL_CALLS] [get_current_weather(location='Paris')]"),
]

# Broken only once the call is under way: `parse` gives it back as text; a stream has already sent it.
BROKEN_LATE = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"days": [1, 2}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}} trailing\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}'),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris"}}, {"name": 3}]',
    ),
]

ALL_TEXTS = [(p, t) for p, t, *_ in WELL_FORMED] + PLAIN + MALFORMED + BROKEN_LATE


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def random_cuts(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, at = [], 0
    while at < len(text):
        size = rng.randint(1, 9)
        pieces.append(text[at : at + size])
        at += size
    return pieces


CUTS = {
    "whole": lambda text: [text],
    "chars": list,
    "random0": lambda text: random_cuts(text, 0),
    "random1": lambda text: random_cuts(text, 1),
}


def streamed(parser_name: str, pieces: list[str]) -> tuple[str | None, list[ToolCall], list[StreamEvent]]:
    stream = get_tool_parser(parser_name).stream()
    events: list[StreamEvent] = []
    for piece in pieces:
        events += stream.feed(piece)
    events += stream.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta)) or None
    return content, stream.calls, events


def check_call_deltas(events: list[StreamEvent], calls: list[ToolCall]) -> None:
    """OpenAI's shape: per call, an opening delta (id, name, arguments "") then argument pieces that add up."""
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [d.index for d in deltas] == sorted(d.index for d in deltas)
    assert sorted({d.index for d in deltas}) == list(range(len(calls)))
    for index, call in enumerate(calls):
        mine = [d for d in deltas if d.index == index]
        assert (mine[0].id, mine[0].name, mine[0].arguments) == (call.id, call.name, "")
        assert all(d.id is None and d.name is None for d in mine[1:])
        assert "".join(d.arguments for d in mine[1:]) == call.arguments


@pytest.mark.parametrize(("parser_name", "text", "content", "expected"), WELL_FORMED)
def test_parse_well_formed(parser_name, text, content, expected):
    parsed = get_tool_parser(parser_name).parse(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == expected
    # Compact JSON, as OpenAI sends it (these samples write no escapes, so it is json.dumps' compact form).
    assert [c.arguments for c in parsed.calls] == [compact(args) for _, args in expected]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)
    assert tool_finish_reason("stop", parsed.calls) == "tool_calls"


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize(("parser_name", "text", "content", "expected"), WELL_FORMED)
def test_stream_matches_parse(parser_name, text, content, expected, cut):
    got_content, calls, events = streamed(parser_name, CUTS[cut](text))
    parsed = get_tool_parser(parser_name).parse(text)
    assert got_content == parsed.content == content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in parsed.calls]
    check_call_deltas(events, calls)


@pytest.mark.parametrize(("parser_name", "text"), PLAIN + MALFORMED)
def test_text_without_a_good_call_is_content(parser_name, text):
    parsed = get_tool_parser(parser_name).parse(text)
    assert parsed == type(parsed)(text, [])
    assert tool_finish_reason("stop", parsed.calls) == "stop"
    for cut in CUTS.values():
        content, calls, events = streamed(parser_name, cut(text))
        assert (content, calls) == (text, [])
        assert all(isinstance(e, ContentDelta) for e in events)


@pytest.mark.parametrize(("parser_name", "text"), BROKEN_LATE)
def test_call_broken_late(parser_name, text):
    parsed = get_tool_parser(parser_name).parse(text)
    assert parsed.content == text and parsed.calls == []
    # The stream sent the call before the fault showed: it keeps it, never raises, and its pieces add up.
    content, calls, events = streamed(parser_name, list(text))
    assert calls and calls[0].name in ("get_weather", "get_current_weather")
    check_call_deltas(events, calls)


@pytest.mark.parametrize(("parser_name", "text"), ALL_TEXTS)
def test_stream_does_not_depend_on_the_cuts(parser_name, text):
    results = []
    for cut in CUTS.values():
        content, calls, events = streamed(parser_name, cut(text))
        check_call_deltas(events, calls)
        results.append((content, [(c.name, c.arguments) for c in calls]))
    assert all(r == results[0] for r in results)


def test_a_broken_call_then_a_good_one():
    bad = "<tool_call>\n{'name': 'get_weather'}\n</tool_call>"
    parsed = get_tool_parser("hermes").parse(bad + "\n" + QWEN_ONE)
    assert parsed.content == bad
    assert [c.name for c in parsed.calls] == ["get_current_temperature"]
    content, calls, _ = streamed("hermes", list(bad + "\n" + QWEN_ONE))
    assert content == bad and [c.name for c in calls] == ["get_current_temperature"]


def test_arguments_keep_strings_as_written():
    text = (
        '<tool_call>\n{"name": "write_file", "arguments": {"path": "C:\\\\temp\\\\new file.txt", '
        '"text": "He said \\"hi\\"\\n  then left", "emoji": "\\ud83d\\ude00", "raw": "line one\nline two"}}\n</tool_call>'
    )
    (call,) = get_tool_parser("hermes").parse(text).calls
    # Whitespace inside strings stays; escapes stay as written; a raw newline is escaped so strict JSON parses.
    assert call.arguments == (
        '{"path":"C:\\\\temp\\\\new file.txt","text":"He said \\"hi\\"\\n  then left",'
        '"emoji":"\\ud83d\\ude00","raw":"line one\\nline two"}'
    )
    assert json.loads(call.arguments) == {
        "path": "C:\\temp\\new file.txt",
        "text": 'He said "hi"\n  then left',
        "emoji": "😀",
        "raw": "line one\nline two",
    }
    _, calls, _ = streamed("hermes", list(text))
    assert calls[0].arguments == call.arguments


def test_stream_sends_the_name_before_the_arguments_end():
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Checking.\n<tool_call>\n") == [ContentDelta("Checking.")]
    opened = stream.feed('{"name": "get_current_temperature", "arguments": {"location": "San ')
    assert isinstance(opened[0], ToolCallDelta) and opened[0].name == "get_current_temperature"
    assert opened[1:] == [ToolCallDelta(0, '{"location":"San ')]
    assert stream.feed('Francisco"}}\n</tool_call>') == [ToolCallDelta(0, 'Francisco"}')]
    assert stream.finish() == []
    assert stream.calls[0].arguments == '{"location":"San Francisco"}'


def test_stream_holds_back_only_a_possible_marker():
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Sure <tool_") == [ContentDelta("Sure")]
    assert stream.feed("box> is a tag") == [ContentDelta(" <tool_box> is a tag")]
    llama = get_tool_parser("llama3_json").stream()
    assert llama.feed('{"na') == []
    opened, piece = llama.feed('me": "f", "parameters": {')
    assert isinstance(opened, ToolCallDelta) and (opened.index, opened.name, opened.arguments) == (0, "f", "")
    assert piece == ToolCallDelta(0, "{")
    plain_json = get_tool_parser("llama3_json").stream()
    assert plain_json.feed('{"city') == []
    # Its first key is no key of a call: it is content from there on.
    assert plain_json.feed('": "Paris"') == [ContentDelta('{"city"'), ContentDelta(': "Paris"')]
    mistral = get_tool_parser("mistral").stream()
    assert mistral.feed("Done. [TOOL_CALLS") == [ContentDelta("Done.")]


def test_chat_delta_shape():
    events: list[StreamEvent] = [
        ContentDelta("Let me check."),
        ToolCallDelta(0, "", id="call_1", name="get_weather"),
        ToolCallDelta(0, '{"city":'),
        ToolCallDelta(0, '"Paris"}'),
        ToolCallDelta(1, "", id="call_2", name="get_time"),
    ]
    assert chat_delta(events) == {
        "content": "Let me check.",
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            },
            {"index": 0, "function": {"arguments": '{"city":"Paris"}'}},
            {
                "index": 1,
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": ""},
            },
        ],
    }
    assert chat_delta([]) == {}
    assert ToolCall("call_1", "f", "{}").to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }


def test_finish_reason():
    call = ToolCall("call_1", "f", "{}")
    assert tool_finish_reason("stop", [call]) == "tool_calls"
    assert tool_finish_reason("length", [call]) == "tool_calls"
    assert tool_finish_reason("length", []) == "length"


# Pieces of the families' chat templates, as they ship in tokenizer_config.json.
QWEN25_TEMPLATE = (
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
)
LLAMA31_TEMPLATE = (
    '{%- if builtin_tools is defined or tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    "{{- '<|python_tag|>' + tool_call.name + '.call(' }}"
)
LLAMA32_TEMPLATE = (
    '{{- "Given the following functions, please respond with a JSON for a function call with its proper '
    'arguments that best answers the given prompt.\\n\\n" }}'
)
MISTRAL_TEMPLATE = (
    '{{- "[AVAILABLE_TOOLS] [" }}{%- for tool in tools %}...{%- endfor %}'
    '{{- "[TOOL_CALLS] [" }}{%- for tool_call in message.tool_calls %}...{%- endfor %}'
)
CHATML_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"


@pytest.mark.parametrize(
    ("template", "vocab", "expected"),
    [
        (QWEN25_TEMPLATE, {}, "hermes"),
        (LLAMA31_TEMPLATE, {}, "llama3_json"),
        (LLAMA32_TEMPLATE, {}, "llama3_json"),
        (MISTRAL_TEMPLATE, {}, "mistral"),
        (QWEN25_TEMPLATE, {"<|python_tag|>": 128010}, "hermes"),  # Hermes 3 on Llama 3.1
        (CHATML_TEMPLATE, {}, None),
        (None, {}, None),
        (CHATML_TEMPLATE, {"<tool_call>": 151657, "</tool_call>": 151658}, "hermes"),
        (None, {"[TOOL_CALLS]": 5}, "mistral"),
        (None, {"<|python_tag|>": 128010}, "llama3_json"),
    ],
)
def test_detect_tool_parser(template, vocab, expected):
    assert detect_tool_parser(template, vocab) == expected


def test_parsers_by_name():
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral"]
    assert get_tool_parser("llama3_json").keep_tokens == ("<|python_tag|>",)
    assert "[TOOL_CALLS]" in get_tool_parser("mistral").keep_tokens
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_parser("qwen")
