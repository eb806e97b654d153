"""Embeddings: the engine's pooled hidden states against transformers' (tests/fixtures/embeddings_reference.json,
made by scripts/make_embedding_fixtures.py) for a decoder embedder (tiny Qwen3, last token) and a
sentence-transformers checkpoint (tiny Llama with modules.json: mean pooling, normalized); then `/v1/embeddings`
on the real SmolLM2 server through the `openai` client, beside chat streams whose greedy text must not change."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path

import httpx
import jax
import numpy as np
import openai
import pytest

from maxjax.config import KVCacheConfig, SchedulerConfig
from maxjax.hub import resolve_model
from maxjax.pipeline import load_model
from maxjax.pooling import checkpoint_pooling
from maxjax.serve.app import ServingState
from maxjax.serve.engine_core import EngineCore
from maxjax.serve.fake_engine import FakeEngine
from maxjax.serve.protocol import GenerationRequest, Pooling, SamplingParams
from tests.serve_helpers import API_KEY, WORDS, RealServer, load_tokenizer, running_server

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "embeddings_reference.json").read_text())


def sentence_transformers_copy(src: Path, dst: Path, mode: str) -> Path:
    """`src` (an HF checkpoint) as a sentence-transformers model: Transformer, Pooling(`mode`), Normalize."""
    shutil.copytree(src, dst)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    flags = {"pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean",
             "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": mode == "last"}
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))
    return dst


def embed_all(path: Path, pooling: Pooling) -> list[np.ndarray]:
    """Every reference sequence embedded in one engine (they share prefill steps; chunks of 16 tokens)."""
    loaded = load_model(resolve_model(str(path)), platform="cpu")
    core = EngineCore.create(loaded, jax.devices("cpu")[0],
                             SchedulerConfig(max_batch_size=4, max_length=64, prefill_chunk_size=16),
                             KVCacheConfig(num_pages=32))  # fmt: skip
    params = SamplingParams(max_tokens=1, temperature=0.0, embed=pooling)
    for i, ids in enumerate(REFERENCE["sequences"]):
        core.add(GenerationRequest(f"e{i}", tuple(ids), params))
    got: dict[str, np.ndarray] = {}
    while core.has_work:
        for seq, out in core.step():
            assert out.token_ids == () and out.finish_reason == "stop" and out.embedding is not None
            got[seq.request_id] = np.asarray(out.embedding)
    assert core.scheduler.pages.in_use == 0 and not core.scheduler.running
    return [got[f"e{i}"] for i in range(len(REFERENCE["sequences"]))]


def assert_close(got: list[np.ndarray], want: list[list[float]]) -> None:
    for g, w in zip(got, want, strict=True):
        cosine = float(g @ np.asarray(w) / np.linalg.norm(g) / np.linalg.norm(w))
        assert cosine >= 0.9999, cosine
        assert abs(np.linalg.norm(g) - 1) < 1e-5


def test_a_decoder_embedder_pools_its_last_token() -> None:
    qwen3 = FIXTURES / "arch" / "qwen3"
    pooling = checkpoint_pooling("hf", qwen3, qwen3)
    assert pooling == Pooling("last", normalize=True)  # no declaration: a decoder embedder's pooling
    assert_close(embed_all(qwen3, pooling), REFERENCE["models"]["qwen3"]["vectors"]["last"])


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_a_sentence_transformers_checkpoint_pools_as_declared(tmp_path: Path, mode: str) -> None:
    model = sentence_transformers_copy(FIXTURES / "arch" / "llama", tmp_path / "st", mode)
    pooling = checkpoint_pooling("hf", model, model)
    assert pooling == Pooling(mode, normalize=True)  # type: ignore[arg-type]
    assert_close(embed_all(model, pooling), REFERENCE["models"]["llama"]["vectors"][mode])


def test_an_unsupported_pooling_declaration_is_refused(tmp_path: Path) -> None:
    model = sentence_transformers_copy(FIXTURES / "arch" / "llama", tmp_path / "st", "max")
    config = model / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        checkpoint_pooling("hf", model, model)


@pytest.fixture(scope="module")
def server(real_server: RealServer) -> RealServer:
    return real_server


def test_embeddings_over_http_float_base64_and_dimensions(server: RealServer) -> None:
    # The client asks for base64 itself and decodes it after parsing, which its strict mode does not allow for.
    client = server.loose_client()
    reply = client.embeddings.create(model="smollm2", input=["hello world", "the cat sat on the mat", "hello world"])
    vectors = [np.asarray(d.embedding) for d in reply.data]
    assert [d.index for d in reply.data] == [0, 1, 2] and len(vectors[0]) == 576
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5) and vectors[0] @ vectors[1] < 0.99
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 0
    # base64: little-endian float32 of the same vector; dimensions: its first N, normalized again.
    raw = httpx.post(server.base_url + "/embeddings", headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "input": "hello world", "encoding_format": "base64", "dimensions": 64}).json()  # fmt: skip
    short = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    want = vectors[0][:64] / np.linalg.norm(vectors[0][:64])
    assert short.shape == (64,) and np.allclose(short, want, atol=1e-5)
    # Token ids are inputs too, one list or several.
    ids = client.embeddings.create(model="smollm2", input=[[28, 29, 30], [31]]).data
    assert len(ids) == 2


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"), ({"input": ""}, "input"), ({"input": ["ok", ""]}, "input"),
    ({"input": [[1, 2], []]}, "input"), ({"input": [10**9]}, "input"), ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({"input": "hi", "dimensions": 100000}, "dimensions"), ({"input": "word " * 700}, "input"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"), ({"input": 5}, "input"),
])  # fmt: skip
def test_bad_embedding_requests_are_400s(server: RealServer, body: dict[str, object], param: str) -> None:
    response = httpx.post(server.base_url + "/embeddings", headers={"Authorization": f"Bearer {API_KEY}"}, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_embeddings_beside_chat_streams_leave_the_chat_unchanged(server: RealServer) -> None:
    chat = dict(model="smollm2", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=24,
                temperature=0.0)

    async def streamed(client: openai.AsyncOpenAI) -> str:
        text = ""
        async for chunk in await client.chat.completions.create(**chat, stream=True):  # type: ignore[call-overload]
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        return text

    async def main() -> tuple[str, list[str], list[int]]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        alone = await streamed(client)
        jobs = [client.embeddings.create(model="smollm2", input=f"sentence number {i} about cats") for i in range(32)]
        results = await asyncio.gather(*jobs, *(streamed(client) for _ in range(3)))
        embeddings, texts = results[:32], results[32:]
        return alone, list(texts), [len(e.data[0].embedding) for e in embeddings]  # type: ignore[union-attr]

    alone, texts, widths = asyncio.run(main())
    assert widths == [576] * 32
    assert texts == [alone] * 3 and alone
    assert server.metric("maxjax_kv_pages_in_use") == 0


def test_a_generation_server_refuses_embeddings_until_asked(smollm2_gguf: Path) -> None:
    """Without `--task embed` (and a checkpoint that declares no pooling) the route says how to turn it on."""
    tok = load_tokenizer(smollm2_gguf)
    state = ServingState(model_name="m")
    state.set_ready(FakeEngine(tok.encode(WORDS), eos_token_id=min(tok.eos_token_ids)), tok)
    with running_server(state) as srv:
        response = httpx.post(srv.base_url + "/embeddings", json={"input": "hi"})
        assert response.status_code == 400 and "--task embed" in response.json()["error"]["message"]
