"""Tokenizer tests: the real SmolLM2 GGUF against the reference ids and renders, both GGUF vocabulary kinds against
transformers' own conversion of the same metadata (fixtures from scripts/make_tokenizer_fixtures.py), the HF
directory loader, pre-tokenizer selection on hand-checkable vocabularies, streaming detokenization, chat templates,
and the errors a bad file gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from maxjax.chat_template import ChatTemplateError
from maxjax.errors import UserError
from maxjax.tokenizer import Tokenizer, load_hf_tokenizer
from maxjax.tokenizer_gguf import load_gguf_tokenizer
from maxjax.weights.gguf import read_metadata

FIXTURES = Path(__file__).parent / "fixtures"


REFERENCE = json.loads((FIXTURES / "smollm2_reference.json").read_text(encoding="utf-8"))
EXPECTED = json.loads((FIXTURES / "tokenizer_expected.json").read_text(encoding="utf-8"))

# Where we knowingly differ from transformers' GGUF conversion. transformers has no split for
# tokenizer.ggml.pre = 'smollm' and falls back to GPT-2's; llama.cpp (and SmolLM2's own tokenizer.json, whose
# pre-tokenizer is Digits(individual_digits) + ByteLevel) first isolates every numeric character. The two agree on
# ASCII digits (no SmolLM2 merge contains one) but not on " ½": GPT-2's split keeps "Ġ½" together and merges
# "ĠÂ" (3351) + "½"'s second byte (138); the digit split gives "Ġ" (216) + "Â½" (16738).
SMOLLM2_KNOWN_DIFFERENCES = {"ℝ² ∑ ≠ ½ ﬁ ｆｕｌｌ": ((3351, 138), (216, 16738))}


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_gguf: Path) -> dict[str, Any]:
    return read_metadata(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata: dict[str, Any]) -> Tokenizer:
    return load_gguf_tokenizer(smollm2_metadata)


@pytest.fixture(scope="module")
def tiny_spm() -> Tokenizer:
    return load_gguf_tokenizer(read_metadata(FIXTURES / "tiny_spm.gguf"))


@pytest.fixture(scope="module")
def tiny_spm_hf(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny vocabulary as transformers' save_pretrained wrote it, loaded through the HF-directory path."""
    folder = tmp_path_factory.mktemp("tiny_spm_hf")
    for name, text in EXPECTED["tiny_spm"]["hf_files"].items():
        (folder / name).write_text(text, encoding="utf-8")
    return load_hf_tokenizer(folder)


def _replace(ids: list[int], old: tuple[int, ...], new: tuple[int, ...]) -> list[int]:
    for k in range(len(ids) - len(old) + 1):
        if tuple(ids[k : k + len(old)]) == old:
            return ids[:k] + list(new) + ids[k + len(old) :]
    raise AssertionError(f"{old} not in {ids}")


def _stream(tok: Tokenizer, ids: list[int], *, skip_special_tokens: bool = False) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


# ---- SmolLM2: the reference facts --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE["tokenization"], ids=lambda c: repr(c["text"])[:24])
def test_smollm2_reference_tokenization(smollm2: Tokenizer, case: dict[str, Any]) -> None:
    assert smollm2.encode(case["text"]) == case["ids"]
    assert smollm2.decode(case["ids"]) == case["text"]


def test_smollm2_reference_chat_renders_and_prompt_ids(smollm2: Tokenizer) -> None:
    for render in REFERENCE["chat_template_renders"]:
        assert smollm2.apply_chat_template(render["messages"]) == render["text"]
    for case in REFERENCE["cases"]:
        prompt = smollm2.apply_chat_template(case["input"]) if case["kind"] == "chat" else case["input"]
        assert smollm2.encode(prompt) == case["prompt_ids"]
        assert smollm2.decode(case["greedy_ids"]) == case["greedy_text"]


def test_smollm2_special_tokens_and_ids(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert smollm2.bos_token_id == 1
    # The GGUF names only <|im_end|> (2) as eos, and no eot/eom; <|endoftext|> (0) is not an end-of-sequence id.
    assert smollm2.eos_token_ids == frozenset({2})
    assert smollm2.add_bos_token is False
    assert smollm2.encode("hi", add_special_tokens=True) == smollm2.encode("hi")
    assert [i for i in range(100) if smollm2.is_special(i)] == list(range(17))  # the 17 control tokens
    assert smollm2.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert smollm2.token_bytes(216) == b" " and smollm2.token_text(216) == " "
    assert smollm2.token_bytes(2) == b"<|im_end|>"
    assert smollm2.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    # Ids past the vocabulary (a padded embedding) decode to nothing rather than failing.
    assert smollm2.decode([19556, 60000, -1]) == "Hello" and smollm2.token_bytes(60000) == b""


def test_smollm2_token_bytes_of_a_split_character(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("🦙")  # four UTF-8 bytes over several byte-level tokens
    assert len(ids) > 1
    assert b"".join(smollm2.token_bytes(i) for i in ids) == "🦙".encode()
    assert "\ufffd" in smollm2.token_text(ids[-1])  # a lone continuation byte, shown as U+FFFD


# ---- both GGUF kinds against transformers' conversion ------------------------------------------------------------


@pytest.mark.parametrize("case", EXPECTED["smollm2"]["cases"], ids=lambda c: repr(c["text"])[:24])
def test_smollm2_matches_transformers(smollm2: Tokenizer, case: dict[str, Any]) -> None:
    ids, ids_special = case["ids"], case["ids_with_special"]
    if case["text"] in SMOLLM2_KNOWN_DIFFERENCES:
        old, new = SMOLLM2_KNOWN_DIFFERENCES[case["text"]]
        ids, ids_special = _replace(ids, old, new), _replace(ids_special, old, new)
    assert smollm2.encode(case["text"]) == ids
    assert smollm2.encode(case["text"], add_special_tokens=True) == ids_special
    assert smollm2.decode(case["ids"]) == case["decoded"]
    assert smollm2.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("source", ["gguf", "hf_dir"])
@pytest.mark.parametrize("case", EXPECTED["tiny_spm"]["cases"], ids=lambda c: repr(c["text"])[:24])
def test_tiny_spm_matches_transformers(
    tiny_spm: Tokenizer, tiny_spm_hf: Tokenizer, source: str, case: dict[str, Any]
) -> None:
    tok = tiny_spm if source == "gguf" else tiny_spm_hf
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], add_special_tokens=True) == case["ids_with_special"]
    assert tok.decode(case["ids"]) == case["decoded"]
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("source", ["gguf", "hf_dir"])
def test_tiny_spm_special_tokens_and_templates(
    tiny_spm: Tokenizer, tiny_spm_hf: Tokenizer, source: str
) -> None:
    tok = tiny_spm if source == "gguf" else tiny_spm_hf
    expected = EXPECTED["tiny_spm"]
    assert tok.bos_token_id == expected["bos_token_id"] == 1
    assert tok.add_bos_token is True
    im_end = tok.encode("<|im_end|>")[0]
    # The GGUF also names <|im_end|> as eot; transformers' saved files know only </s>.
    assert tok.eos_token_ids == ({2, im_end} if source == "gguf" else {2})
    assert tok.token_bytes(3 + 0xE6) == b"\xe6"  # <0xE6> is one byte
    assert tok.token_bytes(tok.encode("hello world")[0]) == b" "  # ▁ is a space
    for chat in expected["chats"]:
        text = tok.apply_chat_template(
            chat["messages"], add_generation_prompt=chat["add_generation_prompt"], tools=chat.get("tools")
        )
        assert text == chat["text"]


# ---- the HF directory loader on a real-size vocabulary -----------------------------------------------------------


def test_hf_directory_roundtrip(smollm2: Tokenizer, tmp_path: Path) -> None:
    smollm2.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [
            {"name": "default", "template": smollm2.chat_template},
            {"name": "tool_use", "template": "TOOLS{{ tools | length }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "terse.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = load_hf_tokenizer(tmp_path)

    for case in REFERENCE["tokenization"]:
        assert tok.encode(case["text"]) == case["ids"]
        assert tok.decode(case["ids"]) == case["text"]
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1
    assert tok.eos_token_ids == {0, 2}  # tokenizer_config's eos and generation_config's list, together
    assert tok.add_bos_token is True and tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]
    render = REFERENCE["chat_template_renders"][0]
    assert tok.apply_chat_template(render["messages"]) == render["text"]
    assert tok.apply_chat_template(render["messages"], tools=[{"x": 1}]) == "TOOLS1"
    assert tok.apply_chat_template(render["messages"], template="terse") == "What is the capital of France?!"
    assert tok.apply_chat_template(render["messages"], template="<{{ bos_token }}>") == "<<|im_start|>>"


def test_hf_directory_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tokenizer.json"):
        load_hf_tokenizer(tmp_path)


# ---- pre-tokenizer selection, on a vocabulary small enough to work out by hand -----------------------------------


def _byte_level_metadata(pre: str | None, merges: list[str]) -> dict[str, Any]:
    from maxjax.tokenizer import _BYTE_SPELLING

    tokens = [_BYTE_SPELLING[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        # GPT-2: "12345" is one word; merge ranks 3+4 first, then 1+2 -> 12 34 5.
        ("gpt2", ["12", "34", "5"]),
        ("default", ["12", "34", "5"]),
        (None, ["12", "34", "5"]),
        # Llama 3: numbers in runs of at most three digits -> "123" "45".
        ("llama-bpe", ["123", "45"]),
        # Qwen2 and SmolLM: every digit alone.
        ("qwen2", ["1", "2", "3", "4", "5"]),
        ("smollm", ["1", "2", "3", "4", "5"]),
    ],
)
def test_pre_tokenizer_by_name(pre: str | None, pieces: list[str]) -> None:
    tok = load_gguf_tokenizer(_byte_level_metadata(pre, ["3 4", "1 2", "12 3", "4 5"]))
    assert [tok.token_text(i) for i in tok.encode("12345")] == pieces
    assert tok.decode(tok.encode(" x 12345\n")) == " x 12345\n"


def test_pre_tokenizer_words() -> None:
    # Llama 3 attaches a leading punctuation mark to a word; GPT-2 keeps it separate.
    merges = ["Ġ w", "Ġw o", "' s", "( w", "(w o"]
    llama3 = load_gguf_tokenizer(_byte_level_metadata("llama3", merges))
    gpt2 = load_gguf_tokenizer(_byte_level_metadata("gpt2", merges))
    assert [llama3.token_text(i) for i in llama3.encode("(wo's wo")] == ["(wo", "'s", " wo"]
    assert [gpt2.token_text(i) for i in gpt2.encode("(wo's wo")] == ["(", "w", "o", "'s", " wo"]


def test_byte_level_control_tokens_are_matched_as_raw_text() -> None:
    # llama.cpp stores control / user-defined tokens as the text they stand for, not in the byte alphabet; they
    # must keep their ids and be matched whole (transformers drops such control tokens instead).
    meta = _byte_level_metadata("gpt2", ["Ġ w"])
    meta["tokenizer.ggml.tokens"] += ["<｜end▁of▁sentence｜>", "<think> "]
    meta["tokenizer.ggml.token_type"] += [3, 4]
    meta["tokenizer.ggml.eos_token_id"] = 257
    tok = load_gguf_tokenizer(meta)
    assert tok.vocab_size == 259
    ids = tok.encode("<think> w<｜end▁of▁sentence｜>")
    assert ids == [258, tok.encode("w")[0], 257]
    assert tok.is_special(257) and not tok.is_special(258) and tok.eos_token_ids == {257}
    assert (
        tok.decode(ids) == "<think> w<｜end▁of▁sentence｜>"
        and tok.decode(ids, skip_special_tokens=True) == "<think> w"
    )


# ---- streaming detokenization -----------------------------------------------------------------------------------


def test_detokenizer_matches_decode_without_partial_characters(
    smollm2: Tokenizer, tiny_spm: Tokenizer
) -> None:
    texts = [c["text"] for c in REFERENCE["tokenization"]] + [c["text"] for c in EXPECTED["smollm2"]["cases"]]
    for tok in (smollm2, tiny_spm):
        for text in texts:
            ids = tok.encode(text)
            for skip in (False, True):
                chunks = _stream(tok, ids, skip_special_tokens=skip)
                assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip), text
                assert not any("\ufffd" in chunk for chunk in chunks), (text, chunks)


def test_detokenizer_holds_bytes_until_a_character_is_complete(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("a🦙b")
    chunks = _stream(smollm2, ids)
    assert chunks[0] == "a" and chunks[-2] == "b" and chunks[-1] == ""
    assert [c for c in chunks[1:-2] if c] == ["🦙"]  # nothing until the emoji's last byte, then all of it
    assert chunks[-3] == "🦙"
    # A stream cut mid-character: the leftover bytes come out of flush() as one U+FFFD, and only there.
    cut = _stream(smollm2, smollm2.encode("a🦙")[:-1])
    assert cut[:-1] == ["a"] + [""] * (len(cut) - 2) and cut[-1] == "\ufffd"


def test_detokenizer_sentencepiece_drops_the_prefix_space_once(tiny_spm: Tokenizer) -> None:
    ids = tiny_spm.encode("hello world")
    assert tiny_spm.token_bytes(ids[0]) == b" "
    chunks = _stream(tiny_spm, ids)
    assert chunks[0] == "" and "".join(chunks) == "hello world"
    # After BOS the space stays when special tokens are kept, as decode does.
    with_bos = [1, *ids]
    assert "".join(_stream(tiny_spm, with_bos)) == tiny_spm.decode(with_bos) == "<s> hello world"
    assert "".join(_stream(tiny_spm, with_bos, skip_special_tokens=True)) == "hello world"
    # Generated text continuing a prompt keeps its space: prompt text + streamed text == decode(prompt + generated).
    prompt, generated = tiny_spm.encode("The café"), tiny_spm.encode("hello world")
    detok = tiny_spm.detokenizer(continuation=True)
    streamed = "".join([detok.add(i) for i in generated] + [detok.flush()])
    assert streamed == " hello world"
    assert tiny_spm.decode(prompt) + streamed == tiny_spm.decode(prompt + generated) == "The café hello world"


# ---- chat templates ---------------------------------------------------------------------------------------------


def test_content_parts_are_flattened_for_string_templates(smollm2: Tokenizer) -> None:
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    text = smollm2.apply_chat_template([{"role": "user", "content": parts}])
    assert "<|im_start|>user\nWhat is the capital\nof France?<|im_end|>" in text
    with pytest.raises(ChatTemplateError, match="image_url"):
        smollm2.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_templates_that_loop_over_content_get_the_parts(smollm2: Tokenizer) -> None:
    template = "{% for m in messages %}{% for p in m['content'] | selectattr('type') %}[{{ p.text }}]{% endfor %}{% endfor %}"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert smollm2.apply_chat_template([{"role": "user", "content": parts}], template=template) == "[a][b]"


def test_template_environment_matches_transformers(smollm2: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "hi", "tool_calls": None, "reasoning": "hmm"}]
    template = (
        "{{ messages[0] | tojson }}|{{ 'tool_calls' in messages[0] }}|{{ messages[0].reasoning_content }}|"
        "{% generation %}{{ strftime_now('%Y') | length }}{% endgeneration %}|{{ {'k': 'é<'} | tojson(indent=1) }}"
    )
    out = smollm2.apply_chat_template(msgs, template=template, add_generation_prompt=False)
    assert (
        out
        == '{"thinking": "hmm", "role": "user", "content": "hi", "reasoning": "hmm", "reasoning_content": "hmm"}|False|hmm|4|{\n "k": "é<"\n}'
    )


def test_template_errors_are_chat_template_errors(smollm2: Tokenizer, tiny_spm: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        tiny_spm.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        smollm2.apply_chat_template([{"role": "user", "content": "x"}], template="{% if %}")
    with pytest.raises(ChatTemplateError, match="no messages"):
        smollm2.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="access to attribute"):  # the sandbox
        smollm2.apply_chat_template([{"role": "user", "content": "x"}], template="{{ ''.__class__.__mro__ }}")
    no_template = load_gguf_tokenizer(_byte_level_metadata("gpt2", []))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


# ---- bad files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"general.architecture": "llama"}, "no tokenizer"),
        ({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]}, "'t5' is not supported"),
        (_byte_level_metadata("no-such-pre", []), "'no-such-pre' is not a pre-tokenizer"),
        ({**_byte_level_metadata("gpt2", []), "tokenizer.ggml.eos_token_id": 999}, "outside the 256-token"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "neither tokenizer.ggml.scores"),
        (
            {
                "general.architecture": "gemma",
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": ["a"],
            },
            "'gemma' are not supported",
        ),
    ],
)
def test_bad_gguf_tokenizers_raise_user_errors(metadata: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        load_gguf_tokenizer(metadata)
    assert "\n" not in str(err.value)
