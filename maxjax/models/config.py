"""`TransformerConfig`: one frozen description of a decoder-only model, built from an HF `config.json` dict.

Every HF default is decided here (`from_hf`), so model files read plain fields. GGUF metadata is first turned
into the same HF-style dict by the architecture's `gguf_to_hf_config`, so both formats share one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maxjax.errors import UserError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, HF's `rope_theta` + `rope_scaling` decided into one hashable value."""

    theta: float = 10000.0
    kind: str = "default"
    """'default', 'linear' or 'llama3'."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    architecture: str
    """HF `architectures[0]`, e.g. 'LlamaForCausalLM'."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    """Q/K/V projections carry biases (Qwen2)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False
    """Queries and keys are RMS-normed per head before the rotary embedding (Qwen3, Gemma 3)."""
    sliding_window: int | None = None
    """Positions a sliding-window layer attends to, its own included; None when no layer slides."""
    layer_types: tuple[str, ...] = ()
    """Per layer, HF's 'full_attention' or 'sliding_attention' (a layer slides only when `sliding_window` is
    set; Gemma 3 also picks each layer's rotary base by it); empty: every layer is full."""
    rope_local: RopeConfig | None = None
    """Rotary settings of the sliding layers when they differ from `rope` (Gemma 3's local base)."""
    rotary_dim: int | None = None
    """Leading dimensions of each head the rotary embedding turns (partial rotary); None: all of them."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by this to the -1/2 (Gemma); None: by head_dim ** -0.5."""
    attn_logit_softcap: float | None = None
    """tanh soft cap on attention scores (Gemma 2 style); None: none."""
    final_logit_softcap: float | None = None
    """tanh soft cap on the output logits; None: none."""
    activation: str = "silu"
    """The gated MLP's activation: 'silu' or 'gelu' (tanh approximation)."""

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None for a full-attention layer."""
        if self.sliding_window is None or not self.layer_types:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> TransformerConfig:
        """Decide every default of an HF config dict. Missing required keys are one clear error.

        A multimodal config is read through its `text_config` (see `text_config_of`). Architecture files that
        know more (Qwen2's implicit biases, Gemma's norms) fill their family's defaults in first and adjust
        the result with `dataclasses.replace`.
        """
        hf = text_config_of(hf)
        try:
            arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            num_layers = int(hf["num_hidden_layers"])
            head_dim = int(hf.get("head_dim") or hidden // num_heads)
            params = hf.get("rope_parameters") or {}
            per_type = "full_attention" in params or "sliding_attention" in params
            scaling = hf.get("rope_scaling") or (params.get("full_attention", {}) if per_type else params)
            theta = float(hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
            rope = rope_from_hf(scaling, theta)
            rope_local = None
            if per_type and "sliding_attention" in params:
                rope_local = rope_from_hf(params["sliding_attention"], theta)
            elif hf.get("rope_local_base_freq") is not None:
                rope_local = RopeConfig(theta=float(hf["rope_local_base_freq"]))
            partial = float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))
            window = hf.get("sliding_window")
            layer_types = tuple(hf.get("layer_types") or ())
            if window is not None and not layer_types:
                layer_types = ("sliding_attention",) * num_layers
            if layer_types and (len(layer_types) != num_layers or not set(layer_types) <= _LAYER_TYPES):
                raise UserError(
                    f"model config: layer_types {list(layer_types)} should name 'full_attention' or "
                    f"'sliding_attention' for each of the {num_layers} layers"
                )
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=head_dim,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=rope,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                sliding_window=int(window) if window is not None and layer_types else None,
                layer_types=layer_types,
                rope_local=rope_local,
                rotary_dim=int(head_dim * partial) if partial != 1.0 else None,
                query_pre_attn_scalar=_float_or_none(hf.get("query_pre_attn_scalar")),
                attn_logit_softcap=_float_or_none(hf.get("attn_logit_softcapping")),
                final_logit_softcap=_float_or_none(hf.get("final_logit_softcapping")),
                activation=_activation(hf.get("hidden_activation") or hf.get("hidden_act") or "silu"),
            )
        except KeyError as e:
            raise UserError(f"model config is missing {e.args[0]!r}: is config.json complete?") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"model config has a bad value ({e}): check config.json") from None


_LAYER_TYPES = {"full_attention", "sliding_attention"}
_ROPE_KINDS = ("default", "linear", "llama3")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_tanh": "gelu"}


def text_config_of(hf: dict[str, Any]) -> dict[str, Any]:
    """The language model's config of a multimodal config (Gemma 3's `text_config`), with the top-level keys it
    does not set (such as `eos_token_id`, `architectures`) kept; a text-only config as it is."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        return hf
    top = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config", "audio_config")}
    return top | text | {"architectures": hf.get("architectures")}


def rope_from_hf(scaling: dict[str, Any], theta: float) -> RopeConfig:
    """HF's `rope_scaling` (or transformers 5's `rope_parameters`, which also holds `rope_theta`) decided."""
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in _ROPE_KINDS:
        raise UserError(
            f"rope scaling {kind!r} is not supported yet (maxjax knows {', '.join(_ROPE_KINDS)}): "
            "serve a model without it"
        )
    return RopeConfig(
        theta=float(scaling.get("rope_theta", theta)),
        kind=kind,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UserError(f"activation {name!r} is not supported (maxjax knows {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]
