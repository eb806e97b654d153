"""Per-choice text: stop strings never leak (not even partly), UTF-8 is never cut, logprobs are finite and shaped."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from maxjax.serve.protocol import GenerationOutput, TokenLogprob
from maxjax.serve.text import (
    LOGPROB_FLOOR,
    ChoiceText,
    StopMatcher,
    chat_logprobs,
    completion_logprobs,
    finite_logprob,
    prompt_offsets,
)
from maxjax.tokenizer import Tokenizer
from tests.serve_helpers import WORDS, load_tokenizer


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    shown = []
    for piece in pieces:
        out, matched = matcher.push(piece)
        shown.append(out)
        if matched:
            return shown, True
    shown.append(matcher.flush())
    return shown, False


def test_stop_matcher_holds_possible_prefixes() -> None:
    m = StopMatcher(["</end>"])
    assert m.push("hello <") == ("hello ", False)
    assert m.push("/e") == ("", False)
    assert m.push("x") == ("</ex", False)  # not a stop after all: released
    assert m.push(" </en") == (" ", False)
    assert m.push("d> tail") == ("", True)


def test_stop_matcher_variants() -> None:
    assert feed(StopMatcher(["ab"]), ["xa", "b", "c"]) == (["x", ""], True)
    assert feed(StopMatcher(["ab"], include_stop=True), ["xa", "bc"]) == (["x", "ab"], True)
    assert feed(StopMatcher(["ab"]), ["xa"]) == (["x", "a"], False)  # the end releases the held text
    assert feed(StopMatcher([]), ["a", "b"]) == (["a", "b", ""], False)
    # The earliest match wins, whichever stop string it is.
    assert feed(StopMatcher(["cd", "b"]), ["abcd"]) == (["a"], True)
    # Overlapping prefixes: "aab" must be found although "aa" looked like a start of "aab" from its first "a".
    assert feed(StopMatcher(["aab"]), ["a", "a", "a", "b"]) == (["", "", "a", ""], True)


def test_stop_strings_never_leak_random(tok: Tokenizer) -> None:
    """Whatever the chunking, what was shown so far is always a prefix of the final text, which ends right
    before the first stop string: so no part of a stop string is ever shown."""
    pool = tok.encode(WORDS)
    rng = random.Random(0)
    for trial in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        full = tok.decode(ids)
        start = rng.randrange(len(full))
        stops = [full[start : start + rng.randint(1, 12)]] + [rng.choice(["zz", " the", "at", "q"])]
        include = trial % 3 == 0
        # The first stop string to complete as tokens arrive wins (earliest start among those completing together).
        k = next(k for k in range(1, len(ids) + 1) if any(s in tok.decode(ids[:k]) for s in stops))
        prefix = tok.decode(ids[:k])
        first, stop_len = min((prefix.find(s), len(s)) for s in stops if s in prefix)
        expected = full[: first + stop_len] if include else full[:first]

        text = ChoiceText(tok, stop=stops, include_stop_str_in_output=include)
        shown, i, consumed, finish = "", 0, 0, None
        while finish is None:
            step = rng.randint(1, 3)
            chunk = tuple(ids[i : i + step])
            i += step
            piece = text.add(GenerationOutput(chunk, finish_reason="length" if i >= len(ids) else None))
            consumed += len(piece.token_ids)
            shown += piece.text
            assert expected.startswith(shown), (stops, full, shown)
            finish = piece.finish_reason
        assert shown == expected and finish == "stop"
        assert consumed == k  # the token that completed the stop string is the last one counted


def test_tokens_after_a_stop_are_dropped(tok: Tokenizer) -> None:
    ids = tok.encode(" the quick brown fox jumps")
    text = ChoiceText(tok, stop=["brown"])
    piece = text.add(GenerationOutput(tuple(ids)))
    assert piece.text == " the quick " and piece.finish_reason == "stop"
    assert piece.token_ids == ids[:3] and text.finished


def test_utf8_is_never_cut(tok: Tokenizer) -> None:
    ids = tok.encode("🦊 café 日本語")
    assert len(ids) > 3
    text = ChoiceText(tok)
    pieces = [text.add(GenerationOutput((t,))).text for t in ids[:-1]]
    pieces.append(text.add(GenerationOutput((ids[-1],), finish_reason="length")).text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "🦊 café 日本語"


def test_special_and_ending_tokens_stay_out_of_the_text(tok: Tokenizer) -> None:
    eos = next(iter(tok.eos_token_ids))
    ids = tok.encode(" the fox")
    text = ChoiceText(tok)
    piece = text.add(GenerationOutput((*ids, 1, eos), finish_reason="stop", stop_token=eos))
    assert piece.text == " the fox" and piece.token_ids == [*ids, 1, eos]
    # An ordinary token the engine stopped on (a stop_token_id) ends the text without showing itself...
    dot = tok.encode(".")[0]
    piece = ChoiceText(tok).add(GenerationOutput((*ids, dot), finish_reason="stop", stop_token=dot))
    assert piece.text == " the fox"
    # ...unless include_stop_str_in_output asks for it; with ignore_eos the eos is an ordinary (special) token.
    piece = ChoiceText(tok, include_stop_str_in_output=True).add(
        GenerationOutput((*ids, dot), finish_reason="stop", stop_token=dot)
    )
    assert piece.text == " the fox."


def test_offsets_count_from_the_echo(tok: Tokenizer) -> None:
    ids = tok.encode(" the quick fox")
    text = ChoiceText(tok, offset=5)
    piece = text.add(GenerationOutput(tuple(ids), finish_reason="length"))
    assert piece.offsets == [5, 9, 15]
    echo, offsets = prompt_offsets(tok, [1, *tok.encode("hi there")])
    assert echo == "hi there" and offsets == [0, 0, 2]
    special = tok.token_text(1)
    echo, offsets = prompt_offsets(tok, [1, *tok.encode("hi there")], special=True)  # a prompt of token ids
    assert echo == special + "hi there" and offsets == [0, len(special), len(special) + 2]


def test_finite_logprob() -> None:
    assert finite_logprob(-math.inf) == LOGPROB_FLOOR
    assert finite_logprob(math.nan) == LOGPROB_FLOOR
    assert finite_logprob(1e-9) == 0.0
    assert finite_logprob(-1.5) == -1.5


def test_logprob_shapes(tok: Tokenizer) -> None:
    fox = tok.encode(" fox")[0]
    the = tok.encode(" the")[0]
    entry = TokenLogprob(fox, -math.inf, ((the, -0.5), (fox, math.nan)))
    (chat,) = chat_logprobs(tok, [entry], top_n=1)
    assert chat == {
        "token": " fox",
        "logprob": LOGPROB_FLOOR,
        "bytes": list(b" fox"),
        "top_logprobs": [{"token": " the", "logprob": -0.5, "bytes": list(b" the")}],
    }
    assert chat_logprobs(tok, [entry], top_n=0)[0]["top_logprobs"] == []
    legacy = completion_logprobs(tok, [the, fox], [None, entry], [0, 4], top_n=2)
    assert legacy == {
        "tokens": [" the", " fox"],
        "token_logprobs": [None, LOGPROB_FLOOR],
        "top_logprobs": [None, {" the": -0.5, " fox": LOGPROB_FLOOR}],
        "text_offset": [0, 4],
    }
    # The sampled token is always among the alternatives, even with logprobs=0.
    assert completion_logprobs(tok, [fox], [entry], [0], top_n=0)["top_logprobs"] == [{" fox": LOGPROB_FLOOR}]
