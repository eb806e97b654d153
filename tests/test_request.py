"""`request.check_stop`, the one rule that says a request finished, alone: every reason, and what it leaves."""

from __future__ import annotations

from pathlib import Path

from maxjax.serve.grammar import GrammarCompiler, GrammarSpec
from maxjax.serve.protocol import SamplingParams
from maxjax.serve.request import Request, Status, check_stop
from maxjax.tokenizer_gguf import load_gguf_tokenizer
from maxjax.weights.gguf import read_metadata

EOS = frozenset({0})


def _after(tokens: list[int], max_length: int = 64, **params: object) -> Request:
    """A request with a 3-token prompt that generated `tokens`, the stop rule checked after each."""
    req = Request("r", [5, 6, 7], SamplingParams(**params))  # type: ignore[arg-type]
    for token in tokens:
        assert not req.finished, "check_stop said it finished before its last token"
        req.tokens.append(token)
        check_stop(req, eos_token_ids=EOS, max_length=max_length)
    return req


def test_end_of_sequence_stops_and_names_the_token() -> None:
    req = _after([9, 0])
    assert req.status is Status.FINISHED and req.finish_reason == "stop" and req.stop_token == 0


def test_ignore_eos_keeps_going_until_the_length() -> None:
    req = _after([0, 0, 0], ignore_eos=True, max_tokens=3)
    assert req.finish_reason == "length" and req.stop_token is None


def test_a_stop_token_id_stops_even_with_ignore_eos() -> None:
    req = _after([9, 42], stop_token_ids=(42,), ignore_eos=True)
    assert req.finish_reason == "stop" and req.stop_token == 42


def test_no_stop_before_min_tokens() -> None:
    req = _after([0, 42, 0], min_tokens=3, stop_token_ids=(42,))
    assert req.finish_reason == "stop" and req.generated == 3


def test_max_tokens_is_length() -> None:
    req = _after([9, 9, 9, 9], max_tokens=4)
    assert req.finish_reason == "length" and req.generated == 4


def test_the_context_end_is_length() -> None:
    req = _after([9, 9], max_length=5, max_tokens=100)
    assert req.finish_reason == "length" and len(req.tokens) == 5


def test_running_requests_are_not_finished_and_abort_is_final() -> None:
    req = _after([9, 9], max_tokens=10)
    assert req.finish_reason is None and req.status is Status.WAITING and not req.finished
    req.abort()
    assert req.finish_reason == "abort" and req.finished
    done = _after([0])
    done.abort()  # a request that already finished keeps its reason
    assert done.finish_reason == "stop"


def test_a_complete_grammar_stops_even_with_ignore_eos(smollm2_gguf: Path) -> None:
    tok = load_gguf_tokenizer(read_metadata(smollm2_gguf))
    eos = frozenset(tok.eos_token_ids)
    answer = tok.encode("42")
    req = Request("r", [5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
    req.logit_state = GrammarCompiler(tok).compile(GrammarSpec.regex("[0-9]{2}"))
    for token in answer:
        assert not req.finished
        req.tokens.append(token)
        assert req.logit_state.advance(token)
        check_stop(req, eos_token_ids=eos, max_length=64)
    assert req.finish_reason == "stop" and req.stop_token is None and req.generated == len(answer)
    open_ended = Request("r", [5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
    open_ended.logit_state = GrammarCompiler(tok).compile(GrammarSpec.regex("[0-9]+"))
    open_ended.tokens.append(answer[0])
    assert open_ended.logit_state.advance(answer[0])
    assert check_stop(open_ended, eos_token_ids=eos, max_length=64) is None, "more digits may follow"
    open_ended.tokens.append(min(eos))  # its mask allows EOS now: the answer is complete
    assert check_stop(open_ended, eos_token_ids=eos, max_length=64) == "stop" and open_ended.stop_token == min(eos)
