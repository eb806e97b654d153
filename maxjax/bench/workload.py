"""What `max benchmark` sends: an endless stream of `Prompt`s, drawn once for the whole sweep so that a later
concurrency level never repeats an earlier level's prompts.

- fixed: the built-in `PROMPTS` in turn (runs compare with each other; the server may cache their prefixes).
- random: about `input_len` tokens of common English words (most are one token with their leading space), all drawn
  from `random.Random(seed)`; the first words differ from request to request, so no prompt shares a cached prefix
  with another, in this run or (with a fresh seed) an earlier one.
- dataset: a ShareGPT-style JSON file, in file order, cycled: the first human turn is the prompt and the first gpt
  turn's length in words stands in for `max_tokens` (unless `output_len` is given).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

PROMPTS = (
    "Explain how a hash table works, with an example.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between TCP and UDP?",
    "Summarize the causes of the French Revolution in a few paragraphs.",
    "Give me a recipe for a simple vegetable soup.",
    "Describe the water cycle to a ten-year-old.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "What should I consider when choosing a laptop for programming?",
    "Explain the difference between weather and climate.",
    "Write a polite email declining a meeting invitation.",
    "How do vaccines train the immune system?",
    "List some tips for learning a new language as an adult.",
    "Explain what a large language model is and how it generates text.",
    "Describe a walk through a busy market in the early morning.",
    "What are the pros and cons of working from home?",
    "Explain recursion, and give an example in any programming language.",
)

_COMMON_NOUNS = """
time year people way day man thing woman life child world school state family student group country problem
hand part place case week company system program question work government number night point home water room
mother area money story fact month lot right study book eye job word business issue side kind head house service
friend father power hour game line end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war history party result change morning
reason research girl guy moment air teacher force education foot boy age policy music market sense nation plan
college interest death experience effect use class control care field development role effort rate heart drug
show leader light voice wife police mind price report decision son view relationship town road arm difference
value building action model season society tax director position player record paper space ground form event
official matter center couple site project activity star table need court oil situation cost industry figure
street image phone data picture practice piece land product doctor wall patient worker news test movie north
love support technology step baby computer type attention film tree source organization hair window evidence
"""
WORDS = tuple(_COMMON_NOUNS.split())


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int


def fixed_prompts(output_len: int) -> Iterator[Prompt]:
    return (Prompt(text, output_len) for text in itertools.cycle(PROMPTS))


def random_prompts(input_len: int, output_len: int, seed: int) -> Iterator[Prompt]:
    rng = random.Random(seed)
    while True:
        yield Prompt(" ".join(rng.choices(WORDS, k=input_len)), output_len)


def dataset_prompts(path: Path, output_len: int | None) -> Iterator[Prompt]:
    """The file's usable conversations, cycled; a file that is not ShareGPT-shaped is a one-line ClickException."""

    def bad(what: str) -> click.ClickException:
        return click.ClickException(
            f"--dataset {path}: {what}; expected a JSON list of "
            '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}'
        )

    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"--dataset {path}: cannot read it ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise bad(f"the top level is a {type(entries).__name__}, not a list")
    prompts = []
    for i, entry in enumerate(entries):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) and _is_turn(t) for t in turns):
            raise bad(f'entry {i} has no "conversations" list of {{"from": str, "value": str}} turns')
        human = next((t["value"] for t in turns if t["from"] == "human"), None)
        gpt = next((t["value"] for t in turns if t["from"] == "gpt"), None)
        if not human or (output_len is None and gpt is None):
            continue  # ShareGPT dumps hold such conversations; they are skipped, as other benchmarks do
        prompts.append(Prompt(human, output_len or max(1, len((gpt or "").split()))))
    if not prompts:
        raise bad("no conversation has a human turn" + (" and a gpt turn" if output_len is None else ""))
    return itertools.cycle(prompts)


def _is_turn(turn: dict[str, object]) -> bool:
    return isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)
