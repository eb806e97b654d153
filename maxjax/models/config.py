"""`TransformerConfig`: one frozen description of a decoder-only model, built from an HF `config.json` dict.

Every HF default is decided here (`from_hf`), so model files read plain fields. GGUF metadata is first turned
into the same HF-style dict by the architecture's `gguf_to_hf_config`, so both formats share one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maxjax.errors import UserError
from maxjax.models.layers import RopeConfig


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

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> TransformerConfig:
        """Decide every default of an HF config dict. Missing required keys are one clear error."""
        try:
            arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
            kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
            theta = float(hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
            rope = RopeConfig(
                theta=theta,
                kind=kind,
                factor=float(scaling.get("factor", 1.0)),
                low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                original_max_position=int(scaling.get("original_max_position_embeddings", 8192)),
            )
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=rope,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise UserError(f"model config is missing {e.args[0]!r}: is config.json complete?") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"model config has a bad value ({e}): check config.json") from None
