"""`--custom-architectures`, `max list`, and what `max serve` says about an architecture it does not know.

The served model is the tiny Llama fixture under another name (`MyLlamaForCausalLM`, which only the module in
tests/fixtures/custom_arch/ registers), started as a real `max serve` process and asked through the `openai`
client, once per spec form: `dir:module` and a bare `module` found on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from maxjax.cli import main
from maxjax.custom import registry_with
from maxjax.errors import UserError
from maxjax.registry import default_registry
from tests.serve_helpers import MAX, free_port, max_serve

CUSTOM = Path(__file__).parent / "fixtures" / "custom_arch"
LLAMA = Path(__file__).parent / "fixtures" / "arch" / "llama"
BUILTINS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
            "Gemma3ForConditionalGeneration", "Phi3ForCausalLM"}


def _checkpoint(folder: Path, architecture: str) -> Path:
    """The tiny Llama fixture, its config naming `architecture`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA / name, folder / name)
    config = json.loads((LLAMA / "config.json").read_text()) | {"architectures": [architecture]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(params=["dir:module", "module"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    model = _checkpoint(tmp_path / "my-llama", "MyLlamaForCausalLM")
    env = dict(os.environ)
    if request.param == "dir:module":
        spec = f"{CUSTOM}:my_arch"
    else:
        spec = "my_arch"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CUSTOM), env.get("PYTHONPATH")]))
    args = ["--model", str(model), "--custom-architectures", spec, "--served-model-name", "tiny",
            "--max-length", "64", "--max-batch-size", "2", "--prefill-chunk-size", "16", "--kv-cache-pages", "16"]
    with max_serve(args, tmp_path / "server.log", env=env) as url:
        yield url


def test_serves_a_custom_architecture_end_to_end(server: str) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=6, temperature=0)
    assert reply.model == "tiny"
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 6
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert isinstance(reply.choices[0].message.content, str)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=6, temperature=0)
    assert again.choices[0].message.content == reply.choices[0].message.content  # greedy: the same text


def test_unregistered_architecture_fails_at_start_up_naming_what_is_supported(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "foo", "FooBarForCausalLM")
    proc = subprocess.run([MAX, "serve", "--model", str(model), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "FooBarForCausalLM" in line and all(name in line for name in BUILTINS), line


def test_max_list_json_names_every_architecture() -> None:
    result = CliRunner().invoke(main, ["list", "--json"])
    assert result.exit_code == 0, result.output
    entries = {a["name"]: a for a in json.loads(result.output)["architectures"]}
    assert set(entries) == BUILTINS
    assert "google/gemma-3-12b-it" in entries["Gemma3ForConditionalGeneration"]["example_repo_ids"]
    for entry in entries.values():
        assert entry["example_repo_ids"] and entry["default_encoding"] in entry["supported_encodings"] + ["bfloat16"]
        assert "float32" in entry["supported_encodings"]
        assert entry["in_blocks_encodings"] == ["q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"]  # on every one
    assert entries["Qwen3ForCausalLM"]["gguf_architectures"] == ["qwen3"]
    takes_images = {name for name, entry in entries.items() if entry["takes_images"]}
    assert takes_images == {"Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"}  # the latter: GGUF + mmproj


def test_max_list_table_with_a_custom_architecture() -> None:
    result = CliRunner().invoke(main, ["list", "--custom-architectures", f"{CUSTOM}:my_arch"])
    assert result.exit_code == 0, result.output
    table, footnote = result.output.split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["ARCHITECTURE", "ENCODINGS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "q4_k*" in rows["LlamaForCausalLM"] and "q5_0*" not in rows["LlamaForCausalLM"]
    assert "(+images)" in rows["Gemma3ForConditionalGeneration"] and "(+images)" not in rows["LlamaForCausalLM"]
    assert footnote.startswith("* multiplied in their blocks")
    assert set(rows) == BUILTINS | {"MyLlamaForCausalLM"}
    assert "example/my-llama" in rows["MyLlamaForCausalLM"]


def test_custom_entries_replace_builtins_of_the_same_name(tmp_path: Path) -> None:
    (tmp_path / "replace_llama.py").write_text(
        "import dataclasses\n"
        "from maxjax.registry import default_registry\n"
        "ARCHITECTURES = [dataclasses.replace(default_registry().get('LlamaForCausalLM'), example_repo_ids=('x/y',))]\n"
    )
    registry = registry_with([f"{tmp_path}:replace_llama"])
    assert registry.get("LlamaForCausalLM").example_repo_ids == ("x/y",)
    assert registry.names() == default_registry().names()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (f"{CUSTOM}:no_arch", "module 'no_arch' has no non-empty ARCHITECTURES list"),
        (f"{CUSTOM}:json", "module 'json' has no non-empty ARCHITECTURES list"),
        (f"{CUSTOM}:no_such_module_here", "cannot import module 'no_such_module_here'"),
        (f"{CUSTOM}/nowhere:my_arch", "is not a directory"),
        (f"{CUSTOM}:", "name a module"),
    ],
)
def test_bad_modules_are_one_clear_error(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        registry_with([spec])
    result = CliRunner().invoke(main, ["list", "--custom-architectures", spec])
    assert result.exit_code == 2 and message.split("'")[0] in result.output
