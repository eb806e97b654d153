"""A GGUF tensor kept in its quantized blocks on its way through an architecture's weight adapter.

The adapters (`load_params`, `gguf_tensor_to_hf`) regroup projection rows: they undo llama.cpp's Q/K
permutation, fuse Q/K/V and gate/up, split a fused tensor. Those move whole rows, and a row of a block-quantized
tensor is a run of whole blocks along the input axis, so they can move the file's bytes unchanged.
`QuantizedRows` is what a checkpoint hands the adapter for a tensor the device multiplies in its blocks
(`Checkpoint.get`): it has the float tensor's `shape` and answers the row operations the adapters use (`reshape`
and `swapaxes` that keep the last axis, `np.concatenate`, `np.stack` and `np.split` along another axis) on its
bytes. Anything else (arithmetic, a mix with float tensors or with another encoding, an operation across the
last axis) sees the tensor dequantized to float32, so an adapter is never wrong for it, only slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maxjax.weights.encodings import from_ggml_type
from maxjax.weights.ggml_blocks import dequantize

_ROW_FUNCTIONS = {np.concatenate, np.stack, np.split}


class QuantizedRows(np.lib.mixins.NDArrayOperatorsMixin):
    """A tensor [..., width] held as its blocks, uint8 [..., width / block * block bytes] of ggml's type
    `ggml_type` (as `GGUFFile.raw` gives them)."""

    __slots__ = ("blocks", "ggml_type", "width")

    def __init__(self, ggml_type: int, blocks: np.ndarray, width: int):
        assert blocks.dtype == np.uint8, blocks.dtype
        self.ggml_type = ggml_type
        self.blocks = blocks
        self.width = width

    @property
    def encoding(self) -> str:
        """maxjax's name of the block type (`q4_1`, ...)."""
        return from_ggml_type(self.ggml_type)

    def __repr__(self) -> str:
        return f"QuantizedRows({self.encoding}, shape={self.shape})"

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.blocks.shape[:-1], self.width)

    @property
    def ndim(self) -> int:
        return self.blocks.ndim

    def dequantized(self) -> np.ndarray:
        """The values as float32 [..., width], as ggml decodes them."""
        return dequantize(self.blocks, self.ggml_type)

    def _rows(self, blocks: np.ndarray) -> QuantizedRows:
        return QuantizedRows(self.ggml_type, blocks, self.width)

    def reshape(self, *shape: Any) -> QuantizedRows | np.ndarray:
        if len(shape) == 1 and isinstance(shape[0], Sequence):
            shape = tuple(shape[0])
        if shape and shape[-1] == self.width:
            return self._rows(self.blocks.reshape(*shape[:-1], self.blocks.shape[-1]))
        return self.dequantized().reshape(shape)

    def swapaxes(self, a: int, b: int) -> QuantizedRows | np.ndarray:
        last = self.ndim - 1
        if a % self.ndim != last and b % self.ndim != last:
            return self._rows(self.blocks.swapaxes(a, b))
        return self.dequantized().swapaxes(a, b)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return self.dequantized().astype(dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self.dequantized()
        return values if dtype is None else values.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return getattr(ufunc, method)(*_dequantized(inputs), **kwargs)

    def __array_function__(self, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func in _ROW_FUNCTIONS:
            result = _on_rows(func, args, kwargs)
            if result is not None:
                return result
        return func(*_dequantized(args), **_dequantized(kwargs))


def _dequantized(value: Any) -> Any:
    """`value` with every QuantizedRows in it (in lists, tuples, dicts) dequantized."""
    if isinstance(value, QuantizedRows):
        return value.dequantized()
    if isinstance(value, list | tuple):
        return type(value)(_dequantized(v) for v in value)
    if isinstance(value, dict):
        return {k: _dequantized(v) for k, v in value.items()}
    return value


def _on_rows(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`func` (concatenate, stack, split) applied to the blocks, where it moves whole rows of one encoding;
    None where it does not."""
    axis = kwargs.get("axis", 0 if len(args) < (3 if func is np.split else 2) else args[-1])
    if func is np.split:
        tensor, parts = args[0], kwargs.get("indices_or_sections", args[1] if len(args) > 1 else None)
        if not isinstance(tensor, QuantizedRows) or axis % tensor.ndim == tensor.ndim - 1:
            return None
        return [tensor._rows(b) for b in np.split(tensor.blocks, parts, axis=axis)]
    tensors = list(args[0])
    first = tensors[0]
    if not all(isinstance(t, QuantizedRows) and t.ggml_type == first.ggml_type and t.width == first.width
               for t in tensors):
        return None
    result_ndim = first.ndim + (func is np.stack)
    if axis % result_ndim == result_ndim - 1:
        return None
    return first._rows(func([t.blocks for t in tensors], axis=axis))
