"""Tools in a chat request: what the chat template sees, what forces a call, and which parser reads the answer.

A request with `tools` (and `tool_choice` other than "none") becomes a `ToolPlan`:

- **The prompt.** A template that reads the `tools` variable (Qwen, Hermes, Llama 3.x, Mistral) gets the tools
  as HF templates expect them (`tools=` in the render: the OpenAI tool objects as sent), and the history as they
  expect it (an assistant turn's `tool_calls[].function.arguments` as an object, not the JSON text OpenAI sends).
  A template that ignores tools (SmolLM2's, and plain ChatML ones) gets a *fallback*: the tools described in a
  system message, in the call format of the server's parser, and earlier calls and tool results written into
  the history as text (calls in that format, results as a user turn in `<tool_response>` tags, Hermes' own
  form), so any template can render them.
- **Enforcement.** `tool_choice: "required"` or a named function compiles a grammar (`tool_call_grammar`): the
  answer is then only calls in the parser's format, each with arguments valid under its function's
  `parameters` schema (closed objects where the function is `strict`); `parallel_tool_calls: false` allows
  exactly one. `auto` is not constrained: the model may answer or call, and the parser reads what it wrote.
- **Reading.** The server's tool parser (`--tool-call-parser`, else detected from the template and vocabulary,
  else `hermes`: the format the fallback teaches) turns the answer into `message.tool_calls`.

The server-wide choices (which parsers, which special tokens they need kept in the text) are `ChatFeatures`,
made once per tokenizer.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import llguidance

from maxjax.serve.grammar import GrammarError, GrammarSpec, error_text, schema_text
from maxjax.serve.reasoning import ReasoningParser, get_reasoning_parser
from maxjax.serve.tool_parsers import ToolParser, detect_tool_parser, get_tool_parser


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model family writes tool calls: `prefix`, then each call as `call_prefix` + JSON + `call_suffix`
    (calls joined by `separator`), then `suffix`. The JSON is `{"name": ..., "<arguments_key>": {...}}`.

    Any of the texts may contain special tokens of the tokenizer (`[TOOL_CALLS]`, `<|python_tag|>`): there the
    grammar asks for that token, not for its spelling in plain text.
    """

    prefix: str = ""
    call_prefix: str = ""
    call_suffix: str = ""
    separator: str = ""
    suffix: str = ""
    arguments_key: str = "arguments"

    def write(self, calls: Sequence[tuple[str, Any]]) -> str:
        """(name, arguments) pairs as the model would write them."""
        bodies = [
            self.call_prefix
            + json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
            + self.call_suffix
            for name, arguments in calls
        ]
        return self.prefix + self.separator.join(bodies) + self.suffix


HERMES = ToolCallFormat(call_prefix="<tool_call>\n", call_suffix="\n</tool_call>", separator="\n")
"""Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call."""
MISTRAL = ToolCallFormat(prefix="[TOOL_CALLS][", separator=", ", suffix="]")
"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`."""
LLAMA3_JSON = ToolCallFormat(separator="; ", arguments_key="parameters")
"""Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`."""

CALL_FORMATS: dict[str, ToolCallFormat] = {"hermes": HERMES, "mistral": MISTRAL, "llama3_json": LLAMA3_JSON}
"""Each tool parser's format, as the grammar forces it and the fallback prompt teaches it."""


@dataclass(frozen=True)
class Function:
    name: str
    parameters: Mapping[str, Any]
    strict: bool
    where: str
    """`tools[i]`, for error messages."""


def check_tools(tools: Sequence[Any]) -> dict[str, Function]:
    """OpenAI `tools`, checked: name -> function. Raises GrammarError (param `tools[i]`)."""
    functions: dict[str, Function] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or tool.get("type", "function") != "function":
            shape = '{"type": "function", "function": {...}}'
            raise GrammarError(f"tools[{i}] is not {shape}", param=f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise GrammarError(f"tools[{i}].function.name must be a non-empty string", param=f"tools[{i}]")
        if name in functions:
            raise GrammarError(f"tools[{i}]: function {name!r} is defined twice", param=f"tools[{i}]")
        params = fn.get("parameters")
        if params is None:  # OpenAI: a function without parameters takes none
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, Mapping):
            raise GrammarError(f"tools[{i}].function.parameters must be a JSON schema object", param=f"tools[{i}]")
        functions[name] = Function(name, params, bool(fn.get("strict", False)), f"tools[{i}]")
    return functions


def chosen_function(tool_choice: Any, functions: Mapping[str, Function]) -> str | None:
    """The function a `tool_choice` object names (checked against `functions`); None for the string forms.
    Raises GrammarError (param `tool_choice`)."""
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise GrammarError(
                f"tool_choice {tool_choice!r} is not one of 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(fn, Mapping) or tool_choice.get("type", "function") != "function":
        raise GrammarError('tool_choice must be a string or {"type": "function", "function": {"name": ...}}',
                           param="tool_choice")
    name = fn.get("name")
    if name not in functions:
        raise GrammarError(
            f"tool_choice names function {name!r}, which is not among the tools "
            f"({', '.join(map(repr, functions)) or 'none given'})",
            param="tool_choice",
        )
    return str(name)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The text of each special token of `tokenizer` -> its id."""
    return {
        tokenizer.token_bytes(i).decode("utf-8", errors="replace"): i
        for i in range(tokenizer.vocab_size)
        if tokenizer.is_special(i) and tokenizer.token_bytes(i)
    }


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str | Mapping[str, Any],
    *,
    special_tokens: Mapping[str, int],
    call_format: ToolCallFormat = HERMES,
    parallel: bool = True,
) -> GrammarSpec:
    """The grammar of an answer that is only tool calls, for `tool_choice` "required" (any of `tools`) or
    `{"type": "function", "function": {"name": ...}}` (that one). `tools` as OpenAI sends them; each call's
    arguments follow its function's `parameters` schema (objects closed where the function is `strict`).
    `special_tokens`: the tokenizer's (`special_token_ids`), so a marker that is one is asked for as that token.
    `parallel`: one or more calls; otherwise exactly one. Raises GrammarError (param `tools` or `tool_choice`)."""
    functions = check_tools(tools)
    if tool_choice != "required" and not isinstance(tool_choice, Mapping):
        raise GrammarError(
            f"tool_choice {tool_choice!r} is not enforced by a grammar: only \"required\" and "
            '{"type": "function", "function": {"name": ...}} are',
            param="tool_choice",
        )
    named = chosen_function(tool_choice, functions)
    chosen = [named] if named is not None else list(functions)
    if not chosen:
        raise GrammarError('tool_choice "required" needs at least one tool', param="tools")

    def literal(text: str) -> str:
        return _lark_literal(text, special_tokens)

    f = call_format
    calls = "call" + (f" ({literal(f.separator)} call)*" if parallel else "")
    lines = [f"start: {literal(f.prefix)} {calls} {literal(f.suffix)}",
             f"call: {literal(f.call_prefix)} body {literal(f.call_suffix)}",
             "body: " + " | ".join(f"fn_{i}" for i in range(len(chosen)))]  # fmt: skip
    for i, name in enumerate(chosen):
        fn = functions[name]
        schema = schema_text(fn.parameters, strict=fn.strict)
        problem = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
        if problem:
            raise GrammarError(f"{fn.where}.function.parameters: {error_text(problem, 'json_schema')}",
                               param=fn.where)
        head = f'{{"name": {json.dumps(name, ensure_ascii=False)}, {json.dumps(f.arguments_key)}: '
        lines.append(f'fn_{i}: {literal(head)} args_{i} "}}"')
        lines.append(f"args_{i}: %json {schema}")
    return GrammarSpec.lark("\n".join(lines))


def _lark_literal(text: str, special_tokens: Mapping[str, int]) -> str:
    """`text` as a sequence of Lark terminals: special tokens as `<[id]>`, the rest as quoted strings."""
    parts: list[str] = []
    while text:
        hits = [(text.find(s), -len(s), s) for s in special_tokens if s in text]
        if not hits:
            parts.append(json.dumps(text, ensure_ascii=False))
            break
        at, _, special = min(hits)
        if at:
            parts.append(json.dumps(text[:at], ensure_ascii=False))
        parts.append(f"<[{special_tokens[special]}]>")
        text = text[at + len(special) :]
    return " ".join(parts)


@functools.lru_cache(maxsize=32)
def template_reads_tools(source: str) -> bool:
    """Whether a chat template uses the `tools` variable (else it would drop them: the fallback is used)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateSyntaxError:
        return False  # rendering will say what is wrong with it


def fallback_prompt(tools: Sequence[Mapping[str, Any]], call_format: ToolCallFormat) -> str:
    """The tools described for a template that ignores them: each function's OpenAI object on a line, and how to
    call one in `call_format`."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    example = call_format.write([("function_name", {"argument": "value"})])
    return (
        "You can call functions to help with the user's request. The functions, with the JSON schema of their "
        f"arguments, are within <tools></tools>:\n<tools>\n{listed}\n</tools>\n"
        "To call functions, answer with only the calls, in this form:\n"
        f"{example}\n"
        "A function's result comes back in the next message, within <tool_response></tool_response>."
    )


def _arguments_object(arguments: Any) -> Any:
    """A history call's arguments as templates want them: OpenAI's JSON text parsed (kept as text if it is not
    JSON)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The history for a template that knows tools: tool calls' arguments as objects."""
    out = []
    for message in messages:
        msg = dict(message)
        if msg.get("tool_calls"):
            calls = copy.deepcopy(msg["tool_calls"])
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and "arguments" in fn:
                    fn["arguments"] = _arguments_object(fn["arguments"])
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def fallback_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, call_format: ToolCallFormat
) -> list[dict[str, Any]]:
    """The history for a template that ignores tools: the tools in the system message (`tools` None: left out),
    calls written as the model writes them, results as user turns."""
    out: list[dict[str, Any]] = []
    for message in messages:
        msg = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id", "name")}
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                fn = call.get("function", {}) if isinstance(call, Mapping) else {}
                calls.append((fn.get("name", ""), _arguments_object(fn.get("arguments", {}))))
            text = call_format.write(calls)
            msg["content"] = f"{message['content']}\n{text}" if message.get("content") else text
        elif message.get("role") == "tool":
            msg = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        out.append(msg)
    if tools:
        prompt = fallback_prompt(tools, call_format)
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "role": "system", "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


@dataclass(frozen=True)
class ChatFeatures:
    """The server's parsers for one tokenizer: made once, when the model is loaded."""

    tool_parser: ToolParser
    reasoning_parser: ReasoningParser | None
    special_tokens: Mapping[str, int]

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, *, tool_call_parser: str | None = None, reasoning_parser: str | None = None
    ) -> ChatFeatures:
        """`tool_call_parser`: a parser's name, or None to detect it from the chat template and vocabulary
        (`hermes` when nothing points elsewhere). Raises ValueError for an unknown name."""
        special = special_token_ids(tokenizer)
        name = tool_call_parser or detect_tool_parser(getattr(tokenizer, "chat_template", None), special)
        return cls(
            tool_parser=get_tool_parser(name or "hermes"),
            reasoning_parser=get_reasoning_parser(reasoning_parser) if reasoning_parser else None,
            special_tokens=special,
        )

    def keep_ids(self, *, tools: bool) -> frozenset[int]:
        """Special tokens the answer's text must keep for the parsers to see them."""
        texts = list(self.tool_parser.keep_tokens if tools else ())
        if self.reasoning_parser is not None:
            texts += self.reasoning_parser.keep_tokens
        return frozenset(self.special_tokens[t] for t in texts if t in self.special_tokens)


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request does about tools."""

    messages: list[dict[str, Any]]
    """The history as the template gets it."""
    template_tools: list[dict[str, Any]] | None
    """`tools=` for the render (None: the template is not given tools)."""
    grammar: GrammarSpec | None
    """The forced call, for "required" or a named function."""
    parser: ToolParser | None
    """Reads the answer's calls; None when tools are off for this request."""

    @classmethod
    def make(
        cls,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
        *,
        parallel: bool,
        template_source: str | None,
        features: ChatFeatures,
    ) -> ToolPlan:
        """Raises GrammarError for tools or a tool_choice that cannot be served."""
        choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
        if tools:
            chosen_function(choice, check_tools(tools))
        elif choice != "none":
            raise GrammarError("tool_choice needs tools", param="tool_choice")
        active = bool(tools) and choice != "none"
        parser = features.tool_parser
        call_format = CALL_FORMATS[parser.name]
        native = template_source is not None and template_reads_tools(template_source)
        has_tool_history = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        if native:
            history = native_messages(messages) if has_tool_history else list(map(dict, messages))
            template_tools = list(map(dict, tools)) if active and tools else None
        else:
            shown = tools if active else None
            history = (fallback_messages(messages, shown, call_format) if has_tool_history or shown
                       else list(map(dict, messages)))  # fmt: skip
            template_tools = None
        grammar = None
        if active and choice != "auto":
            grammar = tool_call_grammar(tools or [], choice, special_tokens=features.special_tokens,
                                        call_format=call_format, parallel=parallel)  # fmt: skip
        return cls(history, template_tools, grammar, parser if active else None)
