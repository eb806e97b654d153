"""Load a resolved model: its config, weights (cast or dequantized to the serving dtype) and tokenizer.

`load_model` is the one place that joins the weight readers (`maxjax/weights/`), the registry and the model
modules; both `max generate` and `max serve` start here. It runs in two halves: `open_checkpoint` reads and checks
everything on disk (config, tensor index, tokenizer) without importing JAX, so a broken or unsupported model is
an error at once; `build_model` then imports JAX and the model module and fills the Flax model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from maxjax.errors import UserError
from maxjax.hub import ResolvedModel
from maxjax.models.config import TransformerConfig
from maxjax.pooling import declared_pooling
from maxjax.registry import Registry, SupportedArchitecture, default_registry
from maxjax.weights import encodings
from maxjax.weights.mmproj import find_mmproj
from maxjax.weights.quantized import QuantizedRows

if TYPE_CHECKING:
    from flax import nnx

    from maxjax.serve.protocol import Pooling

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    config: TransformerConfig
    architecture: SupportedArchitecture
    model: nnx.Module
    dtype: Any
    tokenizer: Any
    """maxjax.tokenizer.Tokenizer"""
    vision: Any = None
    """The vision checkpoint (`config`, `processing`) of a model that takes images; None: text only."""


class TensorSource(Protocol):
    def __call__(self, name: str, keep: Container[str] = (), /) -> np.ndarray | QuantizedRows:
        """HF tensor name -> the stored tensor: as NumPy (dequantized from GGUF's block types), or kept in its
        blocks (`QuantizedRows`) where its encoding is in `keep`."""
        ...


@dataclass
class Checkpoint:
    """A model's files, opened and checked: what `build_model` needs, with no JAX imported yet."""

    resolved: ResolvedModel
    config: Any
    architecture: SupportedArchitecture
    get: TensorSource
    tokenizer: Any
    """maxjax.tokenizer.Tokenizer"""
    pooling: Pooling | None = None
    """The embedding pooling the checkpoint declares (`maxjax/pooling.py`); None when it declares none."""
    vision: Any = None
    """Its vision tower's files, opened (`SupportedArchitecture.open_vision`); None: a text-only model."""


def serving_dtype(resolved: ResolvedModel, platform: str) -> Any:
    """An explicitly asked-for float encoding wins; else float32 on CPU (XLA's bfloat16 matmuls are slow there)
    and bfloat16 on accelerators."""
    import jax.numpy as jnp

    if encodings.is_float(resolved.encoding) and resolved.needs_conversion:
        return jnp.dtype(resolved.encoding)
    return jnp.float32 if platform == "cpu" else jnp.bfloat16


def load_model(
    resolved: ResolvedModel, *, registry: Registry | None = None, platform: str | None = None,
    mmproj: Path | None = None,
) -> LoadedModel:
    return build_model(open_checkpoint(resolved, registry, mmproj=mmproj), platform=platform)


def open_checkpoint(resolved: ResolvedModel, registry: Registry | None = None, *,
                    mmproj: Path | None = None) -> Checkpoint:
    """Read the config, the tensor index and the tokenizer of `resolved` (and of a GGUF's vision tower: `mmproj`,
    else an mmproj file beside it); UserError for anything missing or broken that can be seen without reading
    every weight."""
    registry = registry or default_registry()
    return _open_gguf(resolved, registry, mmproj) if resolved.kind == "gguf" else _open_hf(resolved, registry)


def build_model(checkpoint: Checkpoint, *, platform: str | None = None) -> LoadedModel:
    """The Flax model of an opened checkpoint, its weights cast to the serving dtype of `platform` (default: the
    first device's). A GGUF served in its own encoding keeps each projection and embedding table the device
    multiplies in its blocks there (`Backend.keeps`: the CPU kernel's, or XLA's dequantize-beside-the-matmul)
    as `GGUFBlocks`, which `use_backend` then moves onto the device's form; the rest is dequantized."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from maxjax.kernels import quant
    from maxjax.models.backend import backend_for

    resolved, config, arch, get = checkpoint.resolved, checkpoint.config, checkpoint.architecture, checkpoint.get
    platform = platform or jax.devices()[0].platform
    dtype = serving_dtype(resolved, platform)
    start = time.perf_counter()
    np_dtype = np.dtype(jnp.dtype(dtype))
    backend = backend_for(platform, dtype)
    keep = () if resolved.needs_conversion else [e for e in quant.KINDS if backend.keeps(e)]
    quantize_to = (resolved.encoding if resolved.needs_conversion and resolved.encoding in encodings.QUANTIZE_AT_LOAD
                   else None)
    if quantize_to and not backend.keeps(quantize_to):
        log.warning("%s: this device has no form that multiplies %s blocks; serving %s weights instead",
                    resolved.name, quantize_to, jnp.dtype(dtype).name)
        quantize_to = None

    def get_cast(name: str) -> np.ndarray:
        w = get(name, keep)
        return cast(np.ndarray, w) if isinstance(w, QuantizedRows) else w.astype(np_dtype, copy=False)  # row moves keep blocks

    params = arch.load_params(config, get_cast)
    abstract = nnx.eval_shape(lambda: arch.model_class(config, dtype))
    blocks = _set_aside_blocks(params, _blocks_holders(abstract), np_dtype, quantize_to)
    graphdef, state = nnx.split(abstract)
    expected = {path: (leaf.shape, leaf.dtype) for path, leaf in _flat(state)}
    try:
        nnx.replace_by_pure_dict(state, params)
    except (KeyError, ValueError) as e:
        raise UserError(f"{resolved.path}: weights do not fit the {arch.name} model ({e})") from None
    for path, leaf in _flat(state):
        if isinstance(leaf, jax.ShapeDtypeStruct) or (leaf.shape, leaf.dtype) != expected[path]:
            got = "nothing" if isinstance(leaf, jax.ShapeDtypeStruct) else f"{leaf.shape} {leaf.dtype}"
            raise UserError(f"{resolved.path}: weight {path} should be {expected[path]}, got {got}")
    model = nnx.merge(graphdef, state)
    for where, holder in _blocks_holders(model).items():
        if where in blocks:
            holder.hold_blocks(blocks[where], dtype)
    if checkpoint.vision is not None:
        width = checkpoint.vision.config.text_hidden_size
        if width != config.hidden_size:
            raise UserError(f"{resolved.path}: its vision tower gives soft tokens {width} wide, the model is "
                            f"{config.hidden_size}: name the model's own mmproj file with --mmproj")
        model.vision = checkpoint.vision.build(dtype)  # type: ignore[attr-defined]  # the runner's `model.vision`
    kept = f", {len(blocks)} tensors in their {'/'.join(sorted({b.encoding for b in blocks.values()}))} blocks"
    log.info("loaded %s (%s) as %s%s in %.1f s", resolved.name, resolved.stored_encoding, jnp.dtype(dtype).name,
             kept if blocks else "", time.perf_counter() - start)
    return LoadedModel(config=config, architecture=arch, model=model, dtype=dtype, tokenizer=checkpoint.tokenizer,
                       vision=checkpoint.vision)


def _blocks_holders(model: nnx.Module) -> dict[tuple[str, ...], Any]:
    """Every parameter that can be held in GGUF's blocks (a `Linear`'s kernel, an `Embedding`'s table), by its
    path in the parameter dict, with the module holding it."""
    from flax import nnx

    from maxjax.models.layers import Embedding, Linear

    holders: dict[tuple[str, ...], Any] = {}
    for where, node in nnx.iter_graph(model):
        if isinstance(node, Linear | Embedding):
            holders[(*map(str, where), "kernel" if isinstance(node, Linear) else "weight")] = node
    return holders


ParamPath = tuple[str, ...]
"""A parameter's path in the pure parameter dict."""


def _set_aside_blocks(params: dict[str, Any], holders: Container[ParamPath], dtype: np.dtype[Any],
                      quantize_to: str | None = None, prefix: ParamPath = ()) -> dict[ParamPath, QuantizedRows]:
    """Take the tensors kept in their blocks out of `params` (in place), leaving stand-ins of the float shape
    (for the shape checks; no memory) where a module will hold the blocks, the values dequantized elsewhere.
    With `quantize_to`, a float matrix a module can hold in blocks is first quantized to that encoding as
    llama.cpp's quantizer does (gguf-py's): `--quantization-encoding q8_0` for a float checkpoint."""
    import gguf

    from maxjax.kernels import quant

    taken: dict[ParamPath, QuantizedRows] = {}
    for key, value in params.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            taken |= _set_aside_blocks(value, holders, dtype, quantize_to, path)
            continue
        if quantize_to and path in holders and value.ndim == 2 and value.shape[-1] % quant.BLOCK == 0:
            ggml_type = quant.KINDS[quantize_to].ggml_type
            blocks = gguf.quants.quantize(np.asarray(value, np.float32), gguf.GGMLQuantizationType(ggml_type))
            value = QuantizedRows(ggml_type, blocks, value.shape[-1])
        if isinstance(value, QuantizedRows):
            if path in holders:
                taken[path] = value
                params[key] = np.broadcast_to(np.zeros((), dtype), value.shape)
            else:
                params[key] = value.dequantized().astype(dtype, copy=False)
    return taken


def _flat(state: nnx.State) -> list[tuple[str, Any]]:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def _open_gguf(resolved: ResolvedModel, registry: Registry, mmproj: Path | None) -> Checkpoint:
    from maxjax.tokenizer_gguf import load_gguf_tokenizer
    from maxjax.weights.gguf import GGUFFile

    file = GGUFFile(resolved.path)
    metadata = file.metadata
    arch = registry.for_gguf(file.architecture)
    assert arch.gguf_to_hf_config and arch.gguf_name_to_hf and arch.gguf_tensor_to_hf
    names = set(file.tensor_names)
    try:
        hf_config = arch.gguf_to_hf_config(metadata, names)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{resolved.path}: the GGUF metadata lacks a value the {file.architecture} model needs ({e}); "
            "is the file complete?"
        ) from None
    config = _config(arch, hf_config)
    to_gguf = {}
    for name in names:
        hf_name = arch.gguf_name_to_hf(name)
        if hf_name is not None:
            to_gguf[hf_name] = name
    tensor_to_hf = arch.gguf_tensor_to_hf

    def get(hf_name: str, keep: Container[str] = ()) -> np.ndarray | QuantizedRows:
        if hf_name not in to_gguf:
            raise UserError(f"{resolved.path}: the file has no tensor for {hf_name}; is it a complete model?")
        info = file.tensor_info(to_gguf[hf_name])
        if info.encoding in keep and len(info.shape) == 2:
            tensor: np.ndarray | QuantizedRows = QuantizedRows(info.ggml_type, file.raw(info.name), info.shape[-1])
        else:
            tensor = file.tensor(info.name)
        return tensor_to_hf(hf_name, tensor, hf_config)  # type: ignore[arg-type]  # row moves keep the blocks

    pooling = declared_pooling(resolved.config_dir, metadata)
    tokenizer = load_gguf_tokenizer(metadata)
    vision = None
    if mmproj is not None and arch.open_vision is None:
        raise UserError(f"--mmproj {mmproj}: {arch.name} models take no images")
    if arch.open_vision is not None and (mmproj := mmproj or find_mmproj(resolved.path)) is not None:
        vision = arch.open_vision(None, None, mmproj, tokenizer)
    return Checkpoint(resolved, config, arch, get, tokenizer, pooling, vision)


def _config(arch: SupportedArchitecture, hf_config: dict[str, Any]) -> Any:
    return (arch.config_from_hf or TransformerConfig.from_hf)(hf_config)


def _open_hf(resolved: ResolvedModel, registry: Registry) -> Checkpoint:
    from maxjax.tokenizer import load_hf_tokenizer
    from maxjax.weights.safetensors import SafetensorsWeights

    config_path = resolved.path / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: cannot read the model config ({e}); is the checkpoint complete?") from None
    if not hf_config.get("architectures"):
        raise UserError(f"{config_path} names no architectures: add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    arch = registry.get(hf_config["architectures"][0])
    weights = SafetensorsWeights(resolved.path)  # headers checked before the model module (and JAX) is imported
    config = _config(arch, hf_config)
    stored = {name: name for name in weights.names}
    if arch.weight_name_to_hf is not None:  # e.g. Gemma 3's `language_model.model.*` -> `model.*`
        stored = {hf: name for name in weights.names if (hf := arch.weight_name_to_hf(name)) is not None}

    def get(name: str, keep: Container[str] = ()) -> np.ndarray:
        if name not in stored:
            raise UserError(f"{resolved.path}: the checkpoint has no tensor {name}; is it complete?")
        return weights.get(stored[name])

    tokenizer = load_hf_tokenizer(resolved.config_dir or resolved.path)
    vision = arch.open_vision(resolved.path, hf_config, None, tokenizer) if arch.open_vision is not None else None
    return Checkpoint(resolved, config, arch, get, tokenizer, declared_pooling(resolved.path), vision)
