"""Chat templates: render a conversation to the prompt text the model was trained on, the way HF does.

Templates come from the model (tokenizer_config.json, chat_template.jinja, or GGUF `tokenizer.chat_template`) and
are untrusted code, so they run in jinja2's immutable sandbox. The environment mirrors transformers'
`apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson`
that does not HTML-escape and keeps non-ASCII text), because a template renders byte for byte what its authors
tested only in that environment; any difference shows up as a different prompt and a quietly worse model.

Message preparation, also as transformers does: keys whose value is None are dropped (OpenAI clients send
`"content": null` next to tool calls), and a message's reasoning under `reasoning_content`, `thinking` or
`reasoning` is visible under the first two names.

Content given as a list of parts (`[{"type": "text", "text": ...}, ...]`, the OpenAI form) is flattened to one
string, the parts' texts joined with "\\n" (vLLM's rule), unless the template itself loops over
`message['content']` (`takes_content_parts`) -- then it gets the list as sent. An image part (`{"type": "image"}`,
what Gemma 3's template reads) flattens to `IMAGE_MARKER`, where the HTTP side puts the image's tokens; other
parts cannot be flattened and are an error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_MARKER = "<|maxjax:image|>"
"""Where an image part was, in content flattened for a template that takes a string."""

# Where several reasoning field names exist, templates read the first two; any one of the three fills them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: no template, a broken template, or messages the template rejects.

    A ValueError, so the HTTP layer answers 400 with this one-line message.
    """


class _GenerationTag(Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body.

    Without it, templates written for transformers' training helpers would not even parse.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


def _is_content(node: nodes.Node) -> bool:
    """`message['content']` / `message.content`, possibly behind filters (`| selectattr(...)`)."""
    while isinstance(node, nodes.Filter | nodes.Test) and node.node is not None:
        node = node.node
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return isinstance(node, nodes.Getattr) and node.attr == "content"


def _loops_over_content(tree: nodes.Template) -> bool:
    """Whether the template iterates a message's content itself (so it expects the list of parts)."""
    aliases = {
        assign.target.name
        for assign in tree.find_all(nodes.Assign)
        if isinstance(assign.target, nodes.Name) and _is_content(assign.node)
    }
    for loop in tree.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter | nodes.Test) and it.node is not None:
            it = it.node
        if _is_content(it) or (isinstance(it, nodes.Name) and it.name in aliases):
            return True
    return False


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> tuple[jinja2.Template, bool]:
    """The compiled template and whether it takes content as a list; templates are parsed once per source."""
    try:
        tree = _ENV.parse(source)
        return _ENV.from_string(source), _loops_over_content(tree)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from e


def takes_content_parts(source: str) -> bool:
    """Whether the template `source` loops over a message's content (so it gets the list of parts as sent)."""
    return _compile(source)[1]


def _flatten_content(parts: Sequence[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "image":
            texts.append(IMAGE_MARKER)
        elif (
            isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(
                f"message content part of type {kind!r} is not supported; send text parts"
            )
    return "\n".join(texts)


def _prepare_messages(messages: Sequence[Any], *, flatten: bool) -> list[dict[str, Any]]:
    if not messages:
        raise ChatTemplateError("the conversation has no messages")
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"a chat message must be an object, got {type(message).__name__}")
        msg = {key: value for key, value in message.items() if value is not None}
        if flatten and isinstance(msg.get("content"), list | tuple):
            msg["content"] = _flatten_content(msg["content"])
        reasoning = next((msg[key] for key in _REASONING_FIELDS if key in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        prepared.append(msg)
    return prepared


def select_chat_template(templates: Mapping[str, str], requested: str | None, *, has_tools: bool) -> str:
    """The template source to use: `requested` by name or as source text, else 'tool_use'/'default' (HF's rule)."""
    if requested is not None:
        return templates.get(requested, requested)
    if has_tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if templates:
        raise ChatTemplateError(
            f"this model has several chat templates and no default; name one of {sorted(templates)}"
        )
    raise ChatTemplateError("this model has no chat template; pass one, or use the completions endpoint")


def render_chat_template(
    source: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    **extra: Any,
) -> str:
    """Render `messages` with template `source`; `special_tokens` (bos_token, ...) and `extra` become variables."""
    template, takes_parts = _compile(source)
    variables: dict[str, Any] = {"tools": None, "documents": None, **special_tokens, **extra}
    variables["messages"] = _prepare_messages(messages, flatten=not takes_parts)
    variables["add_generation_prompt"] = add_generation_prompt
    try:
        return template.render(**variables)
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from e
