"""Structured output against the real SmolLM2 server and the real `openai` client: the answer's validity comes
from the grammar mask (the model is far too small to be trusted with JSON), constrained and plain requests share
batches, and a constraint the engine cannot enforce is a 400 that names the problem."""

from __future__ import annotations

import asyncio
import enum
import json
import re
from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve_helpers import RealServer


@pytest.fixture(scope="module")
def server(real_server: RealServer) -> RealServer:
    return real_server


class Role(enum.Enum):
    PILOT = "pilot"
    COOK = "cook"
    DOCTOR = "doctor"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    role: Role
    tags: list[Annotated[str, Field(max_length=12)]] = Field(max_length=3)
    address: Address | None = None


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


PROMPTS = [f"Describe a {adj} {job} as JSON." for adj in ("young", "old", "tall", "happy", "tired")
           for job in ("pilot", "cook", "doctor", "sailor")]


def test_parse_with_a_pydantic_model_always_gives_a_valid_object(server: RealServer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int, prompt: str) -> Person | None:
        completion = await client.chat.completions.parse(
            model="smollm2", messages=_chat(prompt), response_format=Person, temperature=0.7, seed=i,
            max_tokens=160)
        return completion.choices[0].message.parsed

    async def main() -> list[Person | None]:
        client = server.async_client()
        return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(PROMPTS)))

    people = asyncio.run(main())
    assert len(people) == 20 and all(isinstance(p, Person) for p in people)
    assert len({p.model_dump_json() for p in people if p is not None}) > 1, "sampling should vary the answers"
    assert server.metric("maxjax_kv_pages_in_use") == 0


def test_json_object_and_regex_answers_match(server: RealServer) -> None:
    client = server.client()
    for seed in range(3):
        reply = client.chat.completions.create(
            model="smollm2", messages=_chat("Reply with a small JSON object with a name and an age."),
            max_tokens=120, response_format={"type": "json_object"}, temperature=0.8, seed=seed)
        # Any JSON object is unbounded: the grammar makes every answer that ends valid, the budget is the
        # client's (a prompt asking for a cat's description rambles past 200 tokens, finish_reason "length").
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    pattern = r"[0-9]{3}-[0-9]{4}"
    for endpoint in ("chat", "completions"):
        if endpoint == "chat":
            chat = client.chat.completions.create(
                model="smollm2", messages=_chat("What is your phone number?"), max_tokens=20, temperature=1.0,
                extra_body={"structured_outputs": {"regex": pattern}})
            text = chat.choices[0].message.content or ""
            assert chat.choices[0].finish_reason == "stop"
        else:
            completion = server.loose_client().completions.create(
                model="smollm2", prompt="My phone number is", max_tokens=20, temperature=1.0,
                extra_body={"structured_outputs": {"regex": pattern}})
            text = completion.choices[0].text
        assert re.fullmatch(pattern, text), text


def test_constrained_and_plain_requests_share_a_batch(server: RealServer) -> None:
    client = server.client()
    plain = dict(model="smollm2", messages=_chat("Name three colours."), max_tokens=24, temperature=0.0)
    alone = client.chat.completions.create(**plain).choices[0].message.content  # type: ignore[call-overload]

    async def together() -> list[str | None]:
        client = server.async_client()
        constrained = [client.chat.completions.create(
            model="smollm2", messages=_chat("A JSON object please."), max_tokens=40, temperature=0.7, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": {
                "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
                "required": ["n"]}}})
            for i in range(3)]
        replies = await asyncio.gather(client.chat.completions.create(**plain), *constrained)  # type: ignore[call-overload]
        return [r.choices[0].message.content for r in replies]

    first, *others = asyncio.run(together())
    assert first == alone
    assert all(set(json.loads(o or "")) == {"n"} for o in others)


@pytest.mark.parametrize(("body", "fragment"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "not": {"required": ["a"]}}}}}, "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "regex"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "grammar": "start: 'a'"}}}, "exactly one"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}}, "not both"),
])
def test_a_constraint_that_cannot_be_enforced_is_a_400(server: RealServer, body: dict, fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(model="smollm2", messages=_chat("Hi"), max_tokens=5, **body)
    assert fragment in str(err.value.message)
    assert server.client().chat.completions.create(model="smollm2", messages=_chat("Hi"), max_tokens=3).choices
