"""The real SmolLM2 GGUF exported to an HF directory (scripts/gguf_to_hf.py) serves exactly as the GGUF does.

Both load paths end in the same float32 weights, so greedy decoding must give the same token ids, and the
exported tokenizer files must encode and render chat prompts as the GGUF metadata does.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from maxjax.generate import GenerateResult, generate
from maxjax.serve.protocol import SamplingParams
from maxjax.tokenizer import Tokenizer, load_hf_tokenizer
from maxjax.tokenizer_gguf import load_gguf_tokenizer
from maxjax.weights.gguf import read_metadata

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gguf_to_hf.py"
PROMPT = "What is the capital of France?"
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)

AWKWARD = [
    "Hello, world!",
    "",
    "  two  spaces\tand\ttabs\n\nnewlines\r\n",
    "def f(x):\n    return x ** 2  # squared",
    "numbers 1234567 and 3.14159, 1e-9",
    "unicode: café, naïve, 東京, Ελληνικά, 🤗🚀, e\u0301",
    "<|im_start|>user\nspecial tokens in text<|im_end|><|endoftext|>",
    "<|im_start|almost special",
]
CONVERSATIONS = [
    [{"role": "user", "content": PROMPT}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "  Bye \n"},
    ],
]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gguf_to_hf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out: Path = _script().convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2-hf"))
    yield out
    shutil.rmtree(out)  # 540 MB of float32 weights; pytest would keep them for three runs


@pytest.fixture(scope="module")
def gguf_answer(smollm2_gguf: Path) -> GenerateResult:
    return generate(model=str(smollm2_gguf), prompt=PROMPT, chat=True, params=GREEDY, stream=False)


def test_exported_files(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    token_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (token_config["bos_token"], token_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert (
        token_config["add_bos_token"] is False
        and "{% for message in messages %}" in token_config["chat_template"]
    )
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_gguf_answers_the_reference(gguf_answer: GenerateResult) -> None:
    assert gguf_answer.text == "The capital of France is Paris."
    assert gguf_answer.token_ids[-1] == 2  # <|im_end|> ended it, well before max_tokens


def test_hf_export_decodes_the_same_tokens(hf_dir: Path, gguf_answer: GenerateResult) -> None:
    from_hf = generate(model=str(hf_dir), prompt=PROMPT, chat=True, params=GREEDY, stream=False)
    assert from_hf.prompt_tokens == gguf_answer.prompt_tokens
    assert from_hf.token_ids == gguf_answer.token_ids
    assert from_hf.text == gguf_answer.text


@pytest.fixture(scope="module")
def tokenizers_pair(smollm2_gguf: Path, hf_dir: Path) -> tuple[Tokenizer, Tokenizer]:
    return load_gguf_tokenizer(read_metadata(smollm2_gguf)), load_hf_tokenizer(hf_dir)


@pytest.mark.parametrize("text", AWKWARD)
def test_hf_export_tokenizer_encodes_the_same(
    text: str, tokenizers_pair: tuple[Tokenizer, Tokenizer]
) -> None:
    gguf_tok, hf_tok = tokenizers_pair
    ids = gguf_tok.encode(text)
    assert hf_tok.encode(text) == ids
    assert hf_tok.encode(text, add_special_tokens=True) == gguf_tok.encode(text, add_special_tokens=True)
    assert hf_tok.decode(ids) == gguf_tok.decode(ids) == text
    assert hf_tok.decode(ids, skip_special_tokens=True) == gguf_tok.decode(ids, skip_special_tokens=True)


def test_hf_export_tokenizer_specials_and_template(tokenizers_pair: tuple[Tokenizer, Tokenizer]) -> None:
    gguf_tok, hf_tok = tokenizers_pair
    assert (hf_tok.bos_token_id, hf_tok.eos_token_ids, hf_tok.add_bos_token) == (
        gguf_tok.bos_token_id,
        gguf_tok.eos_token_ids,
        gguf_tok.add_bos_token,
    )
    assert [i for i in range(gguf_tok.vocab_size) if hf_tok.is_special(i)] == [
        i for i in range(gguf_tok.vocab_size) if gguf_tok.is_special(i)
    ]
    assert hf_tok.chat_template == gguf_tok.chat_template
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            rendered = gguf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert (
                hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == rendered
            )
    assert rendered.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n")
