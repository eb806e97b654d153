"""Every built-in architecture against transformers, on the tiny random checkpoints in tests/fixtures/arch/.

scripts/make_arch_fixtures.py made each checkpoint from a transformers model with every tensor randomized and
recorded transformers' logits at all 24 positions of one sequence. Here the same checkpoint goes through
`resolve_model` + `load_model` and the sequence through the paged KV cache the way the server runs it: two
prefill chunks (the second reading the first from the cache), then one token per decode step, with pages of 4
tokens. Windowed families have a window of 8, so positions 8-23 are past it (the fixture records how much the
window changes those logits: several units, so the comparison depends on it).

GGUF: the fixture script also wrote each GGUF family's weights as F32, F16 and Q8_0 files with
`tests/gguf_writer.py` (llama.cpp's conventions) and recorded what transformers' own GGUF loader computes from
them. The tests write the same files again (same SHA-256) and load them with maxjax.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
import pytest
from flax import nnx

from maxjax.errors import UserError
from maxjax.graph.runner import CacheSpec
from maxjax.hub import resolve_model
from maxjax.models.backend import Backend, backend_for
from maxjax.models.config import TransformerConfig
from maxjax.models.layers import KVCache, use_backend, write_kv
from maxjax.pipeline import LoadedModel, load_model
from maxjax.registry import Registry, default_registry
from tests.gguf_writer import Q, write_gguf

FIXTURES = Path(__file__).parent / "fixtures" / "arch"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").is_file())
TOLERANCE = 1e-4
PAGE_SIZE = 4


@cache
def reference(family: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    folder = FIXTURES / family
    arrays = np.load(folder / "reference.npz")
    return json.loads((folder / "reference.json").read_text()), {k: arrays[k] for k in arrays.files}


@nnx.jit
def _step(model: Any, tokens: jax.Array, cache: KVCache, pages: jax.Array,
          past_len: jax.Array) -> tuple[jax.Array, ...]:
    """One prefill chunk or decode step: logits [T, V] and the chunk's keys and values. Module-level, so that
    tests of one configuration (a family's broken copies, its GGUF storage types) share its compiles."""
    hidden, new_k, new_v = model.forward(tokens, cache, pages, past_len)
    return model.logits(hidden)[0], new_k, new_v


def paged_logits(loaded: LoadedModel, tokens: np.ndarray, chunks: list[int], backend: Backend | None = None
                 ) -> np.ndarray:
    """Logits [T, V] at every position: `chunks` prefilled, then the rest decoded one token at a time, each step
    reading the past from the paged cache and writing its own keys/values after, as `graph/runner.py` does: one
    jitted step per token count, a page table as wide as the sequence (pages past `past_len` masked), and on CPU
    maxjax's kernels (packed projections, attention read from the pool) where they build, or on `backend`."""
    cfg = loaded.config
    n_pages = -(-len(tokens) // PAGE_SIZE) + 1
    cache = CacheSpec(cfg.num_layers, n_pages, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=loaded.dtype).allocate()
    pages = np.arange(1, n_pages, dtype=np.int32)  # page 0 is the scratch page
    use_backend(loaded.model, backend or backend_for("cpu", loaded.dtype))

    out, start = [], 0
    for n in [*chunks, *[1] * (len(tokens) - sum(chunks))]:
        positions = np.arange(start, start + n)
        logits, new_k, new_v = _step(loaded.model, tokens[None, start : start + n], cache, pages[None],
                                     np.array([start], np.int32))
        out.append(np.asarray(logits))
        slots = pages[positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE
        cache = write_kv(cache, new_k, new_v, slots[None])
        start += n
    return np.concatenate(out)


def run_fixture(family: str, loaded: LoadedModel) -> np.ndarray:
    record, arrays = reference(family)
    return paged_logits(loaded, arrays["tokens"], record["prefill_chunks"])


def load(path: Path, registry: Registry | None = None) -> LoadedModel:
    return load_model(resolve_model(str(path)), registry=registry, platform="cpu")


# ------------------------------------------------------------------------------ safetensors checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_matches_transformers(family: str) -> None:
    record, arrays = reference(family)
    loaded = load(FIXTURES / family)
    assert loaded.architecture.name == record["architecture"]
    if "sliding_window" in record:
        assert loaded.config.sliding_window == record["sliding_window"]
        assert record["window_effect"]["max_abs_diff_past"] > 1.0  # the window matters past position 8
    err = np.abs(run_fixture(family, loaded) - arrays["logits"]).max()
    print(f"{family}: max |logit error| {err:.2e} (logit std {record['logit_std']:.2f})")
    assert err <= TOLERANCE


def test_every_builtin_architecture_has_a_fixture() -> None:
    assert {reference(f)[0]["architecture"] for f in FAMILIES} == set(default_registry().names())


def _perturbed(family: str, change: Callable[[Callable[[str], np.ndarray]], Callable[[str], np.ndarray]]) -> float:
    """Max logit error when the checkpoint's tensors are read through `change(get)`."""
    base = default_registry()
    record, arrays = reference(family)
    arch = base.get(record["architecture"])
    broken = dataclasses.replace(arch, load_params=lambda cfg, get: arch.load_params(cfg, change(get)))
    base.register(broken)
    return float(np.abs(run_fixture(family, load(FIXTURES / family, base)) - arrays["logits"]).max())


def _swap(a: str, b: str) -> Callable[[Callable[[str], np.ndarray]], Callable[[str], np.ndarray]]:
    return lambda get: lambda name: get(name.replace(a, b) if a in name else name.replace(b, a))


def _zero(suffix: str) -> Callable[[Callable[[str], np.ndarray]], Callable[[str], np.ndarray]]:
    return lambda get: lambda name: np.zeros_like(get(name)) if name.endswith(suffix) else get(name)


@pytest.mark.parametrize(
    ("family", "change"),
    [
        ("qwen2", _zero("layers.1.self_attn.k_proj.bias")),
        ("qwen2", _zero("layers.0.self_attn.v_proj.bias")),
        ("qwen3", _swap("self_attn.q_norm", "self_attn.k_norm")),
        ("gemma3", _swap("pre_feedforward_layernorm", "post_feedforward_layernorm")),
        ("gemma3_multimodal", _swap("input_layernorm", "post_attention_layernorm")),
        ("llama", _swap("input_layernorm", "post_attention_layernorm")),
        ("phi3", _swap("layers.0.input_layernorm", "layers.1.input_layernorm")),
    ],
    ids=["qwen2-k-bias-dropped", "qwen2-v-bias-dropped", "qwen3-qk-norms-swapped", "gemma3-mlp-norms-swapped",
         "gemma3-multimodal-attn-norms-swapped", "llama-norms-swapped", "phi3-layer-norms-swapped"],
)
def test_a_dropped_bias_or_swapped_norms_fail_the_comparison(
    family: str, change: Callable[[Callable[[str], np.ndarray]], Callable[[str], np.ndarray]]
) -> None:
    assert _perturbed(family, change) > 100 * TOLERANCE


@pytest.mark.parametrize("family", [f for f in FAMILIES if "sliding_window" in reference(f)[0]])
def test_without_the_window_the_comparison_fails_past_it(family: str) -> None:
    """The same model attending to everything matches before position 8 and not after: the paged path really
    applies the window (in prefill chunks and in decode)."""
    registry = default_registry()
    record, arrays = reference(family)
    arch = registry.get(record["architecture"])
    decide = arch.config_from_hf
    assert decide is not None
    registry.register(dataclasses.replace(
        arch, config_from_hf=lambda hf: dataclasses.replace(decide(hf), sliding_window=None)
    ))
    err = np.abs(run_fixture(family, load(FIXTURES / family, registry)) - arrays["logits"]).max(axis=-1)
    window = record["sliding_window"]
    assert err[:window].max() <= TOLERANCE
    assert err[window:].max() > 100 * TOLERANCE


# ------------------------------------------------------------------------------------------------ GGUF

GGUF_FAMILIES = [f for f in FAMILIES if "gguf" in reference(f)[0]]


@pytest.mark.parametrize(
    ("family", "qtype"),
    [(f, q) for f in GGUF_FAMILIES for q in reference(f)[0]["gguf"]["files"]],
)
def test_gguf_matches_transformers_gguf_loader(family: str, qtype: str, tmp_path: Path) -> None:
    record, arrays = reference(family)
    info = record["gguf"]
    folder = FIXTURES / family
    config = json.loads((folder / "config.json").read_text())
    import safetensors.numpy

    weights = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    path = tmp_path / f"{family}-{qtype}.gguf"
    sha = write_gguf(path, info["architecture"], config, weights, Q[qtype], name=f"tiny-{family}")
    assert sha == info["files"][qtype]["sha256"], "not the file transformers read: was tests/gguf_writer.py changed?"
    loaded = load(path)
    assert loaded.architecture.name == info["files"][qtype]["transformers_class"]
    assert loaded.config.num_layers == record_layers(family)
    n = info["positions_compared"]
    # F32 holds the checkpoint's exact weights (transformers read it to the reference logits, recorded as 0 off);
    # F16 and Q8_0 hold rounded ones, dequantized to the same float32 values by both loaders.
    want = arrays["logits"] if qtype == "F32" else arrays[f"gguf_{qtype}"]
    got = run_fixture(family, loaded)
    err = np.abs(got[:n] - want[:n]).max()
    print(f"{family} {qtype}: max |logit error| {err:.2e} vs transformers' GGUF loader")
    assert err <= TOLERANCE
    if qtype != "F32":  # and the storage type really changed the weights
        assert np.abs(got[:n] - arrays["logits"][:n]).max() > 10 * TOLERANCE


def record_layers(family: str) -> int:
    config = json.loads((FIXTURES / family / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers"])


def test_gguf_writer_names_are_maxjax_names() -> None:
    """Every tensor name gguf-py's converter table gives maps back to the HF name, through maxjax's own table."""
    registry = default_registry()
    for family in GGUF_FAMILIES:
        info = reference(family)[0]["gguf"]
        arch = registry.for_gguf(info["architecture"])
        assert arch.gguf_name_to_hf is not None
        import safetensors.numpy

        names = safetensors.numpy.load_file(str(FIXTURES / family / "model.safetensors"))
        layers = record_layers(family)
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[info["architecture"].upper()], layers)
        for hf_name in names:
            gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert gguf_name is not None and arch.gguf_name_to_hf(gguf_name) == hf_name, (family, hf_name)


# ------------------------------------------------------------------------------------------ configs


def test_gemma3_hub_config_defaults() -> None:
    """google/gemma-3-12b-it's config.json as the Hub has it: a sparse text_config, the old key names."""
    hub = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "eos_token_id": [1, 106],
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_attention_heads": 16,
            "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"hidden_size": 1152},
    }
    cfg = default_registry().get("Gemma3ForConditionalGeneration").config_from_hf(hub)  # type: ignore[misc]
    assert (cfg.head_dim, cfg.vocab_size, cfg.query_pre_attn_scalar, cfg.activation) == (256, 262208, 256, "gelu")
    assert cfg.eos_token_ids == (1, 106) and cfg.tie_word_embeddings and cfg.qk_norm
    assert [cfg.layer_window(i) for i in range(6)] == [1024] * 5 + [None]
    assert (cfg.rope.theta, cfg.rope.kind, cfg.rope.factor) == (1e6, "linear", 8.0)
    assert cfg.rope_local is not None and (cfg.rope_local.theta, cfg.rope_local.kind) == (1e4, "default")


def test_family_defaults() -> None:
    registry = default_registry()
    base = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100}

    def cfg(name: str, **extra: Any) -> TransformerConfig:
        return registry.get(name).config_from_hf(base | {"architectures": [name]} | extra)  # type: ignore[misc]

    assert cfg("MistralForCausalLM").sliding_window == 4096  # MistralConfig's default
    assert cfg("MistralForCausalLM", sliding_window=None).sliding_window is None
    assert cfg("Qwen2ForCausalLM", sliding_window=32768).attention_bias  # biases without a config key
    assert cfg("Qwen2ForCausalLM", sliding_window=32768).sliding_window is None  # use_sliding_window is off
    windows = cfg("Qwen2ForCausalLM", sliding_window=8, use_sliding_window=True, max_window_layers=1)
    assert [windows.layer_window(i) for i in range(2)] == [None, 8]
    assert cfg("Qwen3ForCausalLM").head_dim == 128 and cfg("Qwen3ForCausalLM").qk_norm
    assert cfg("LlamaForCausalLM", sliding_window=8).sliding_window is None  # HF's Llama has no window
    assert cfg("Phi3ForCausalLM", partial_rotary_factor=0.5).rotary_dim == 8
    with pytest.raises(UserError, match="'longrope' is not supported"):
        cfg("Phi3ForCausalLM", rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]})
    with pytest.raises(UserError, match="activation 'relu'"):
        cfg("LlamaForCausalLM", hidden_act="relu")
