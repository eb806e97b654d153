"""Make tests/fixtures/arch/<family>/: a tiny random checkpoint per architecture and transformers' logits for it.

    /tmp/devvenv/bin/python scripts/make_arch_fixtures.py      # needs torch, transformers, gguf, safetensors

Only for making fixtures: maxjax never imports torch or transformers. For each family this script

1. builds the transformers model from a tiny config (hidden 64, vocab 260, a few layers, a sliding window of 8
   where the family has one) and randomizes every tensor: matrices with unit-variance outputs, embeddings
   N(0, 1), norm weights around 1 with spread 0.2 (Gemma's stored `weight - 1` around 0), biases N(0, 0.3²);
2. saves it with `save_pretrained` (config.json, model.safetensors, float32) plus a byte-level tokenizer.json;
3. records its logits at every position of one 24-token sequence (`reference.npz`), checks that transformers'
   own cached decode reproduces them, and measures how much the sliding window changes them (so a test that
   passes "past the window" really depends on it);
4. for the families GGUF defines, writes the weights as F32, F16 and Q8_0 GGUF files with `tests/gguf_writer.py`
   (llama.cpp's conventions), reads each back with transformers' own GGUF loader, records its logits and the
   file's SHA-256 (the tests rewrite the file, check the hash, and load it with maxjax). Keys transformers'
   loader does not read from GGUF metadata are set on its config by hand, each listed with the reason in
   reference.json (`transformers_config_overrides`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import safetensors.numpy
import tokenizers
import torch
import transformers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.gguf_writer import SPECIAL_TOKENS, TOKENS, Q, write_gguf  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "arch"
WINDOW = 8
SEQ_LEN = 24
PREFILL_CHUNKS = (5, 7)
"""The tests prefill 12 tokens in two chunks (the second one reading the first from the paged cache), then
decode the other 12 one at a time: positions 8.. are past the window."""

COMMON: dict[str, Any] = {
    "vocab_size": len(TOKENS),
    "hidden_size": 64,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "class": "LlamaForCausalLM",
        "config": dict(model_type="llama", intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
        "gguf": "llama",
    },
    "mistral": {
        "class": "MistralForCausalLM",
        "config": dict(model_type="mistral", intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, sliding_window=WINDOW, rms_norm_eps=1e-5, tie_word_embeddings=False),
        # llama.cpp converts Mistral to `llama`, which has no window: the file matches within the window only.
        "gguf": "llama",
        "gguf_types": (Q.F32,),
    },
    "qwen2": {
        "class": "Qwen2ForCausalLM",
        "config": dict(model_type="qwen2", intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
        "gguf": "qwen2",
    },
    "qwen3": {
        "class": "Qwen3ForCausalLM",
        "config": dict(model_type="qwen3", intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
        "gguf": "qwen3",
        "overrides": {"head_dim": "transformers reads no head width for qwen3 (qwen3.attention.key_length) and "
                                  "assumes 128"},
    },
    "gemma3": {
        "class": "Gemma3ForCausalLM",
        "config": dict(model_type="gemma3_text", intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                       rope_scaling={"rope_type": "linear", "factor": 8.0}, tie_word_embeddings=True),
        "gguf": "gemma3",
        "overrides": {
            "query_pre_attn_scalar": "not in GGUF; transformers assumes 256, llama.cpp uses head_dim (as here)",
            "rope_parameters": "transformers does not read gemma3.rope.scaling.* (the global layers' linear scaling)",
        },
    },
    "gemma3_multimodal": {
        "class": "Gemma3ForConditionalGeneration",
        "config": dict(
            model_type="gemma3", mm_tokens_per_image=4, image_token_index=259, boi_token_index=257,
            eoi_token_index=258,
            text_config=dict(intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                             rope_scaling={"rope_type": "linear", "factor": 8.0}),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
        ),
        "gguf": None,  # llama.cpp writes its text model as a `gemma3` file: the gemma3 family's check covers it
    },
    "phi3": {
        "class": "Phi3ForCausalLM",
        "config": dict(model_type="phi3", intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, sliding_window=WINDOW, rms_norm_eps=1e-5, tie_word_embeddings=False),
        "gguf": "phi3",
        "overrides": {"sliding_window": "transformers does not read phi3.attention.sliding_window"},
    },
}


def make_config(spec: dict[str, Any]) -> transformers.PretrainedConfig:
    kw = dict(spec["config"])
    model_type = kw.pop("model_type")
    if "text_config" in kw:
        kw["text_config"] = COMMON | kw["text_config"]
        top = {k: v for k, v in COMMON.items() if k not in ("vocab_size", "hidden_size", "max_position_embeddings")}
        kw = top | kw
    else:
        kw = COMMON | kw
    config = transformers.AutoConfig.for_model(model_type, **kw)
    config.architectures = [spec["class"]]
    return config


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random, at scales where each one visibly moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    gemma_norms = {f"{m}.weight" for m, mod in model.named_modules() if "Gemma3RMSNorm" in type(mod).__name__}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                base = 0.0 if name in gemma_norms else 1.0
                p.copy_(base + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.3 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json: GPT-2's byte-level BPE over the 260-token vocabulary the GGUF files carry."""
    vocab = {token: i for i, token in enumerate(TOKENS)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }, indent=2) + "\n")


@torch.no_grad()
def full_logits(model: torch.nn.Module, tokens: torch.Tensor) -> np.ndarray:
    return model(input_ids=tokens[None]).logits[0].float().numpy()


@torch.no_grad()
def cached_logits(model: torch.nn.Module, tokens: torch.Tensor) -> np.ndarray:
    """transformers' own incremental path: the prefill chunks, then one token at a time through its cache."""
    out, past, start = [], None, 0
    for n in [*PREFILL_CHUNKS, *[1] * (len(tokens) - sum(PREFILL_CHUNKS))]:
        chunk = tokens[start : start + n]
        result = model(input_ids=chunk[None], cache=past, use_cache=True,
                       cache_position=torch.arange(start, start + n))
        out.append(result.logits[0].float().numpy())
        past, start = result.cache, start + n
    return np.concatenate(out)


def text_weights(folder: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(folder / "model.safetensors"))


def make_family(family: str, spec: dict[str, Any], seed: int) -> None:
    folder = OUT / family
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    config = make_config(spec)
    config._attn_implementation = "eager"
    cls = getattr(transformers, spec["class"])
    model = cls(config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    write_tokenizer(folder)

    rng = np.random.default_rng(seed)
    tokens = torch.tensor([1, *rng.integers(3, len(TOKENS), SEQ_LEN - 1)], dtype=torch.long)
    logits = full_logits(model, tokens)
    record: dict[str, Any] = {
        "architecture": spec["class"],
        "made_by": "scripts/make_arch_fixtures.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0"},
        "tokens": tokens.tolist(),
        "prefill_chunks": list(PREFILL_CHUNKS),
        "logit_std": float(logits.std()),
        "transformers_cached_decode_max_abs_diff": float(np.abs(cached_logits(model, tokens) - logits).max()),
    }
    text_cfg = config.get_text_config()
    if getattr(text_cfg, "sliding_window", None):
        record["sliding_window"] = text_cfg.sliding_window
        wide = make_config(spec)
        wide.get_text_config().sliding_window = 4096
        wide._attn_implementation = "eager"
        unwindowed = cls(wide).eval()
        unwindowed.load_state_dict(model.state_dict())
        diff = np.abs(full_logits(unwindowed, tokens) - logits)
        record["window_effect"] = {"max_abs_diff_within": float(diff[:WINDOW].max()),
                                   "max_abs_diff_past": float(diff[WINDOW:].max())}
    arrays = {"tokens": tokens.numpy().astype(np.int32), "logits": logits.astype(np.float32)}

    if spec.get("gguf"):
        arrays |= check_gguf(family, spec, folder, tokens, logits, record)
    np.savez_compressed(folder / "reference.npz", **arrays)
    (folder / "reference.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{family}: logit std {record['logit_std']:.2f}, cached decode diff "
          f"{record['transformers_cached_decode_max_abs_diff']:.1e}, window {record.get('window_effect')}, "
          f"gguf {record.get('gguf', {}).get('files')}")


def check_gguf(family: str, spec: dict[str, Any], folder: Path, tokens: torch.Tensor, logits: np.ndarray,
               record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Write each GGUF type, read it back with transformers' GGUF loader, and record its logits."""
    arch = spec["gguf"]
    config = json.loads((folder / "config.json").read_text())
    weights = text_weights(folder)
    overrides = spec.get("overrides", {})
    ref_config = transformers.AutoConfig.from_pretrained(folder)
    files: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    # Mistral as a `llama` file has no window: it can only match within it.
    positions = WINDOW if family == "mistral" else SEQ_LEN
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in spec.get("gguf_types", (Q.F32, Q.F16, Q.Q8_0)):
            name = f"{family}-{qtype.name}.gguf"
            sha = write_gguf(Path(tmp) / name, arch, config, weights, qtype, name=f"tiny-{family}")
            gguf_config = transformers.AutoConfig.from_pretrained(tmp, gguf_file=name)
            for key in overrides:
                setattr(gguf_config, key, getattr(ref_config, key))
            gguf_config._attn_implementation = "eager"
            model = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=name, config=gguf_config, dtype=torch.float32
            ).eval()
            got = full_logits(model, tokens)
            diff = float(np.abs(got[:positions] - logits[:positions]).max())
            files[qtype.name] = {"sha256": sha, "transformers_class": type(model).__name__,
                                 "transformers_max_abs_diff_to_reference": diff}
            if qtype != Q.F32:
                arrays[f"gguf_{qtype.name}"] = got.astype(np.float32)
            else:
                assert diff < 1e-4, f"{family}: transformers reads the F32 file {diff} away from the checkpoint"
    record["gguf"] = {
        "architecture": arch,
        "positions_compared": positions,
        "files": files,
        "transformers_config_overrides": {k: {"value": _jsonable(getattr(ref_config, k)), "why": why}
                                          for k, why in overrides.items()},
    }
    return arrays


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def main() -> None:
    torch.set_num_threads(1)
    families = sys.argv[1:] or list(FAMILIES)
    for i, family in enumerate(FAMILIES):
        if family in families:
            make_family(family, FAMILIES[family], seed=1000 + i)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"fixtures: {total / 1024:.0f} KiB in {OUT}")


if __name__ == "__main__":
    main()
