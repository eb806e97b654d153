"""The reasoning parsers on Qwen3's and DeepSeek-R1's output as their chat templates shape it: whole answers,
and the same answers streamed one character at a time and in random cuts."""

from __future__ import annotations

import random

import pytest

from maxjax.serve.reasoning import (
    REASONING_PARSERS,
    ReasoningDelta,
    get_reasoning_parser,
)

# Qwen3 (hybrid thinking): the template leaves the prompt at "<|im_start|>assistant\n" and the model opens
# the thinking itself.
QWEN3_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
QWEN3_ANSWER = (
    "<think>\nOkay, the user is asking for the capital of France. That's Paris.\n\n"
    "Let me double-check: yes, Paris.\n</think>\n\nThe capital of France is **Paris**."
)
# Qwen3 with enable_thinking=False: the template writes an empty think block into the prompt.
QWEN3_NO_THINK_PROMPT = QWEN3_PROMPT + "<think>\n\n</think>\n\n"
# DeepSeek-R1 (and Qwen3's thinking-only models): the template ends the prompt with "<think>\n", so the
# answer starts inside the thinking and only the closing tag appears.
R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 2?<｜Assistant｜><think>\n"
R1_ANSWER = "Okay, so I need to add 2 and 2. 2 + 2 = 4. 数学很简单 ✓\n</think>\n\nThe answer is $4$."

# (parser, prompt or None, text, reasoning, content)
CASES = [
    (
        "qwen3",
        QWEN3_PROMPT,
        QWEN3_ANSWER,
        "Okay, the user is asking for the capital of France. That's Paris.\n\nLet me double-check: yes, Paris.",
        "The capital of France is **Paris**.",
    ),
    (
        "qwen3",
        None,
        QWEN3_ANSWER,
        "Okay, the user is asking for the capital of France. That's Paris.\n\nLet me double-check: yes, Paris.",
        "The capital of France is **Paris**.",
    ),
    (
        "qwen3",
        QWEN3_NO_THINK_PROMPT,
        "The capital of France is Paris.\n",
        None,
        "The capital of France is Paris.\n",
    ),
    (
        "qwen3",
        None,
        "  Paris. Note: </think> is only text here.",
        None,
        "  Paris. Note: </think> is only text here.",
    ),
    ("qwen3", None, "<think>\n\n</think>\n\nParis.", None, "Paris."),
    (
        "qwen3",
        None,
        "<think>\nThe user wants a long proof. Step 1:",
        "The user wants a long proof. Step 1:",
        "",
    ),
    ("qwen3", None, "<thinking> is a word", None, "<thinking> is a word"),
    ("qwen3", None, "", None, ""),
    (
        "deepseek_r1",
        R1_PROMPT,
        R1_ANSWER,
        "Okay, so I need to add 2 and 2. 2 + 2 = 4. 数学很简单 ✓",
        "The answer is $4$.",
    ),
    (
        "deepseek_r1",
        None,
        R1_ANSWER,
        "Okay, so I need to add 2 and 2. 2 + 2 = 4. 数学很简单 ✓",
        "The answer is $4$.",
    ),
    # Older R1 builds write the opening tag themselves.
    ("deepseek_r1", None, "<think>\nHmm, 2 + 2.\n</think>\n\n4", "Hmm, 2 + 2.", "4"),
    ("deepseek_r1", None, "Still working on it </thi", "Still working on it </thi", ""),
    # A Qwen3 thinking-only model: the prompt opened the thinking, whatever the family usually does.
    ("qwen3", QWEN3_PROMPT + "<think>\n", "Paris, clearly.</think>Paris.", "Paris, clearly.", "Paris."),
    # A tool call after the thinking is content, for the tool parser to read.
    (
        "qwen3",
        None,
        '<think>\nI should call the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call>',
        "I should call the weather tool.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
]


def random_cuts(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, at = [], 0
    while at < len(text):
        size = rng.randint(1, 6)
        pieces.append(text[at : at + size])
        at += size
    return pieces


CUTS = {
    "whole": lambda text: [text],
    "chars": list,
    "random0": lambda text: random_cuts(text, 0),
    "random1": lambda text: random_cuts(text, 1),
}


@pytest.mark.parametrize(("name", "prompt", "text", "reasoning", "content"), CASES)
def test_split(name, prompt, text, reasoning, content):
    assert get_reasoning_parser(name).split(text, prompt=prompt) == (reasoning, content)


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize(("name", "prompt", "text", "reasoning", "content"), CASES)
def test_stream_matches_split(name, prompt, text, reasoning, content, cut):
    stream = get_reasoning_parser(name).stream(prompt=prompt)
    deltas = [stream.feed(piece) for piece in CUTS[cut](text)] + [stream.finish()]
    assert ("".join(d.reasoning for d in deltas) or None, "".join(d.content for d in deltas)) == (
        reasoning,
        content,
    )
    # Reasoning never follows content.
    first_content = next((i for i, d in enumerate(deltas) if d.content), len(deltas))
    assert not any(d.reasoning for d in deltas[first_content + 1 :])


def test_stream_holds_back_only_a_possible_tag():
    stream = get_reasoning_parser("qwen3").stream()
    assert stream.feed("<thi") == ReasoningDelta("", "")
    assert stream.feed("nk>\nFirst, ") == ReasoningDelta("First,", "")
    assert stream.feed("recall facts.\n</th") == ReasoningDelta(" recall facts.", "")
    assert stream.feed("ink>\n\nParis") == ReasoningDelta("", "Paris")
    assert stream.feed(" it is.\n") == ReasoningDelta("", " it is.\n")
    assert stream.finish() == ReasoningDelta("", "")

    plain = get_reasoning_parser("qwen3").stream()
    assert plain.feed("\n") == ReasoningDelta("", "")
    assert plain.feed("Paris <") == ReasoningDelta("", "\nParis <")

    inside = get_reasoning_parser("deepseek_r1").stream()
    assert inside.feed("2 + 2 </") == ReasoningDelta("2 + 2", "")
    assert inside.feed("b> is bold") == ReasoningDelta(" </b> is bold", "")


def test_prompt_decides_where_the_answer_starts():
    qwen3, r1 = get_reasoning_parser("qwen3"), get_reasoning_parser("deepseek_r1")
    assert not qwen3.starts_in_reasoning() and r1.starts_in_reasoning()
    assert qwen3.starts_in_reasoning(R1_PROMPT) and not r1.starts_in_reasoning(QWEN3_PROMPT)
    assert not qwen3.starts_in_reasoning(QWEN3_NO_THINK_PROMPT)


def test_parsers_by_name():
    assert sorted(REASONING_PARSERS) == ["deepseek_r1", "qwen3"]
    assert get_reasoning_parser("qwen3").keep_tokens == ("<think>", "</think>")
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("r1")
