"""The step's batch declared once (graph/batch.py): the table and the named tuples the graphs read agree, and the
abstract shapes and the padding come from it."""

from __future__ import annotations

import numpy as np

from maxjax.graph import batch
from maxjax.graph.batch import FIELDS, StepInputs
from maxjax.graph.sampling import ADJUST_SLOTS, LogitAdjustments, SamplingArrays


def test_every_input_of_the_graphs_is_declared_once() -> None:
    names = [f.name for f in FIELDS]
    tuples = ([n for n in StepInputs._fields if n not in ("sampling", "adjust")]
              + [f"sampling.{n}" for n in SamplingArrays._fields] + [f"adjust.{n}" for n in LogitAdjustments._fields])
    assert sorted(names) == sorted(tuples) and len(set(names)) == len(names)


def test_abstract_shapes_and_padding_agree() -> None:
    shapes = batch.abstract(4, 16, 32, vocab_size=1000)
    pad = batch.padding(4, 16, 32, vocab_size=1000)
    for a, p in zip(_leaves(shapes), _leaves(pad), strict=True):
        assert a.shape == p.shape and np.dtype(a.dtype) == p.dtype
    assert pad.tokens.shape == (4, 16) and pad.page_table.shape == (4, 32) and pad.past_len.shape == (4,)
    assert pad.adjust.ids.shape == (4, ADJUST_SLOTS) and (pad.adjust.ids == 1000).all()  # a slot that edits nothing
    assert pad.adjust.allowed.shape == (4, 32) and (pad.adjust.allowed == -1).all()  # every token allowed
    assert (pad.sampling.top_p == 1).all() and (pad.adjust.repetition == 1).all() and not pad.adjust.seen.any()


def _leaves(inputs: StepInputs) -> list[object]:
    return [*inputs[:-2], *inputs.sampling, *inputs.adjust]
