"""Which image's soft tokens are in which slot of the device's image table: the engine's encoder cache.

A model that takes images keeps a table of `slots` images' soft tokens on the device (`ModelRunner.encode_images`
writes it, prefill steps read it). Before a prefill step runs, every image among its chunks must be in a slot:
`place` finds the ones already there by their content digest (a picture sent again, in a follow-up turn or by
another request, is not encoded again) and gives the others the least recently used slots, which the engine
then encodes. A step holds at most `Scheduler.images_per_step` images, fewer than the slots, so the slots a step
reads are never given away to another image before it runs (the device runs encodes and steps in order).
Pure Python: tested without JAX.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class ImageTable:
    def __init__(self, slots: int):
        self.slots = slots
        self._by_digest: OrderedDict[bytes, int] = OrderedDict()
        """digest -> slot, least recently used first."""
        self._free = list(range(slots - 1, -1, -1))
        self.encoded = 0
        """Images encoded so far."""
        self.reused = 0
        """Images found in the table instead (their soft tokens already there)."""

    def place(self, digests: Sequence[bytes]) -> tuple[list[int], list[int]]:
        """The slot of each of `digests` (one step's images; at most `slots`), and the indices into `digests` of
        those that must be encoded into theirs now (a digest repeated within the call is encoded once)."""
        assert len(set(digests)) <= self.slots, "a step holds fewer images than the table has slots"
        for digest in digests:  # the step's images already here become the most recent: none is given away
            if digest in self._by_digest:
                self._by_digest.move_to_end(digest)
        slots, encode, fresh = [], [], set()
        for i, digest in enumerate(digests):
            slot = self._by_digest.get(digest)
            if slot is None:
                slot = self._free.pop() if self._free else self._by_digest.popitem(last=False)[1]
                self._by_digest[digest] = slot
                encode.append(i)
                fresh.add(digest)
                self.encoded += 1
            elif digest not in fresh:
                self.reused += 1
            slots.append(slot)
        return slots, encode
