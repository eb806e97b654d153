"""Make tests/fixtures/embeddings_reference.json: transformers' embeddings of the tiny architecture fixtures.

    /tmp/devvenv/bin/python scripts/make_embedding_fixtures.py     # needs torch and transformers

Only for making fixtures: maxjax never imports torch or transformers. For the tiny Qwen3 checkpoint (a decoder
used as an embedder, as Qwen3 Embedding is: last-token pooling, normalized) and the tiny Llama checkpoint read
as a sentence-transformers model (mean pooling, then a Normalize module; the test writes its `modules.json`
and `1_Pooling/config.json` beside a copy), this records `AutoModel`'s final hidden states pooled that way for a
few token sequences: short, and longer than one prefill chunk, so pooling across chunks is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "tests" / "fixtures" / "arch"
OUT = ROOT / "tests" / "fixtures" / "embeddings_reference.json"
SEQUENCES = [[5, 17, 200, 33, 9], list(range(40, 53)), [(7 * i + 3) % 250 + 4 for i in range(37)]]
CASES = {"qwen3": "last", "llama": "mean"}


def pooled(hidden: np.ndarray, kind: str) -> np.ndarray:
    vector = {"last": hidden[-1], "mean": hidden.mean(axis=0), "cls": hidden[0]}[kind].astype(np.float64)
    return vector / np.linalg.norm(vector)


def main() -> None:
    out: dict[str, object] = {"sequences": SEQUENCES, "models": {}}
    for family, kind in CASES.items():
        model = transformers.AutoModel.from_pretrained(ARCH / family, dtype=torch.float32).eval()
        vectors = {}
        for pooling in ("last", "mean", "cls"):
            rows = []
            for ids in SEQUENCES:
                with torch.no_grad():
                    hidden = model(torch.tensor([ids])).last_hidden_state[0].numpy()
                rows.append(pooled(hidden, pooling).round(7).tolist())
            vectors[pooling] = rows
        out["models"][family] = {"declared_pooling": kind, "vectors": vectors}  # type: ignore[index]
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
