"""The `max` command. Imports nothing heavy at module level: `max --help` must answer at once."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from maxjax import __version__
from maxjax.bench.command import benchmark
from maxjax.errors import UserError
from maxjax.serve.reasoning import REASONING_PARSERS
from maxjax.serve.tool_parsers import TOOL_PARSERS


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit status 2, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="maxjax")
@click.option("--log-level", default="INFO", show_default=True, help="Python log level.")
def main(log_level: str) -> None:
    """maxjax: serve language models behind an OpenAI-compatible API, on JAX/XLA."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        # JAX reports at INFO every backend it probes and does not find (TPU, GPU plug-ins): noise, not news.
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def model_options(f: Any) -> Any:
    """The flags that say which weights to load and where."""
    for option in reversed([
        click.option("--model", default=None, help="HF id, local directory or .gguf file [default: SmolLM2-135M-Instruct Q4_1]."),
        click.option("--revision", default=None, help="Revision (branch, tag, commit) of an HF id."),
        click.option("--quantization-encoding", default=None,
                     help="Which GGUF encoding to use, or a float type to dequantize to (float32, bfloat16, ...)."),
        click.option("--devices", default=None,
                     help="cpu, gpu, gpu:0 or tpu; several (gpu:0,1 or cpu:0,1) shard the model over them (tensor "
                          "parallel) [default: JAX's default backend]."),
    ]):
        f = option(f)
    return f


def mmproj_option(f: Any) -> Any:
    """`--mmproj`: the vision tower of a GGUF model that takes images (llama.cpp's split file)."""
    return click.option(
        "--mmproj", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="llama.cpp's mmproj GGUF of the model's vision tower, so a GGUF Gemma 3 takes images [default: an "
             "*mmproj*.gguf beside the model, if there is one].")(f)


def custom_architectures_option(f: Any) -> Any:
    """`--custom-architectures`, repeatable: modules whose ARCHITECTURES lists add to (or replace) the built-ins."""
    return click.option(
        "--custom-architectures", multiple=True, metavar="[DIR:]MODULE",
        help="Import MODULE (from DIR, when given) and register its ARCHITECTURES list; repeatable.",
    )(f)


def engine_options(f: Any) -> Any:
    """The flags that decide the KV pool and the bucket grid, so `serve` and `warm-cache` compile the same
    executables."""
    for option in reversed([
        click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(min=1),
                     help="Most sequences in one decode step."),
        click.option("--max-length", default=None, type=click.IntRange(min=16),
                     help="Longest sequence (prompt + output) [default: the model's context length]."),
        click.option("--device-memory-utilization", default=None, type=click.FloatRange(0, 1, min_open=True),
                     help="Share of device memory to use; the KV cache gets what the weights leave "
                          "[default: 0.9 on GPU/TPU; on CPU a quarter of the memory available at start]."),
        click.option("--kv-cache-page-size", default=16, show_default=True, type=click.IntRange(min=1)),
        click.option("--kv-cache-pages", default=None, type=click.IntRange(min=2),
                     help="An explicit KV pool size in pages (overrides --device-memory-utilization)."),
        click.option("--prefill-chunk-size", default=512, show_default=True, type=click.IntRange(min=16),
                     help="Prompt tokens per prefill step (a power of two); longer prompts are chunked."),
        click.option("--overlap-scheduler/--no-overlap-scheduler", default=True, show_default=True,
                     help="Plan and dispatch each step while the one before still runs (decode rows read their "
                          "token on the device)."),
        click.option("--max-images-per-request", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Most images one request may carry, for a model that takes images."),
    ]):
        f = option(f)
    return f


def compile_cache_options(f: Any) -> Any:
    """Where compiled executables persist between starts."""
    for option in reversed([
        click.option("--compile-cache-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
                     help="Directory of the compile cache [default: compile/ in maxjax's cache directory]."),
        click.option("--no-compile-cache", is_flag=True,
                     help="Neither load nor store compiled executables (every start compiles the whole grid)."),
    ]):
        f = option(f)
    return f


def _engine_configs(max_batch_size: int, max_length: int | None, device_memory_utilization: float | None,
                    kv_cache_page_size: int, kv_cache_pages: int | None, prefill_chunk_size: int,
                    overlap_scheduler: bool, max_images_per_request: int, compile_cache_dir: Path | None,
                    no_compile_cache: bool) -> dict[str, Any]:
    """The scheduler, KV and compile-cache parts of a `PipelineConfig` from `engine_options` and
    `compile_cache_options` (ValueError on a bad value)."""
    from maxjax.config import CompileCacheConfig, KVCacheConfig, SchedulerConfig

    return {
        "scheduler": SchedulerConfig(max_batch_size=max_batch_size, max_length=max_length,
                                     prefill_chunk_size=prefill_chunk_size, overlap=overlap_scheduler,
                                     max_images_per_request=max_images_per_request),
        "kv_cache": KVCacheConfig(page_size=kv_cache_page_size, device_memory_utilization=device_memory_utilization,
                                  num_pages=kv_cache_pages),
        "compile_cache": CompileCacheConfig(enabled=not no_compile_cache, directory=compile_cache_dir),
    }


@main.command()
@model_options
@custom_architectures_option
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template as a user message.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0.0, 2.0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--min-p", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=None, type=int)
def generate(model: str | None, revision: str | None, quantization_encoding: str | None, devices: str | None,
             custom_architectures: tuple[str, ...], prompt: str, chat: bool, max_new_tokens: int,
             temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None) -> None:
    """Generate text for one prompt, streamed to stdout."""
    from maxjax.custom import registry_with
    from maxjax.generate import generate as run
    from maxjax.serve.protocol import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            min_p=min_p, seed=seed)
    result = run(model=model, prompt=prompt, chat=chat, params=params, devices=devices,
                 quantization_encoding=quantization_encoding, revision=revision,
                 registry=registry_with(custom_architectures))
    click.echo(
        f"prompt tokens: {result.prompt_tokens}, generated: {len(result.token_ids)}, "
        f"time to first token: {result.time_to_first_token_s * 1e3:.0f} ms, "
        f"decode: {result.decode_tokens_per_s:.1f} tok/s",
        err=True,
    )


@main.command()
def fetch() -> None:
    """Fetch the default model (SmolLM2-135M-Instruct Q4_1) into the cache, if it is not there yet."""
    from maxjax.fetch import default_model_path

    click.echo(default_model_path())


main.add_command(benchmark)


@main.command()
@model_options
@mmproj_option
@custom_architectures_option
@click.option("--served-model-name", default=None, help="The model id clients send [default: the --model value].")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@engine_options
@compile_cache_options
@click.option("--max-queue-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Requests that may wait for a batch row; beyond it, 429.")
@click.option("--chat-template", default=None, help="A Jinja chat template file (or template text) to use instead of the model's.")
@click.option("--api-key", default=None, envvar="MAXJAX_API_KEY",
              help="Require `Authorization: Bearer <key>` on /v1 routes [env: MAXJAX_API_KEY].")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds open requests get to finish after SIGTERM or Ctrl-C; new ones get 503 meanwhile.")
@click.option("--tool-call-parser", default=None, type=click.Choice(sorted(TOOL_PARSERS)),
              help="How the model writes tool calls [default: detected from the chat template, else hermes].")
@click.option("--reasoning-parser", default=None, type=click.Choice(sorted(REASONING_PARSERS)),
              help="Split the model's <think> reasoning into reasoning_content [default: none].")
@click.option("--task", default=None, type=click.Choice(["generate", "embed"]),
              help="embed: also serve /v1/embeddings [default: embed for checkpoints that declare a pooling].")
@click.option("--web-ui/--no-web-ui", default=True, show_default=True,
              help="Serve a chat page at / (no API key needed to load it; it asks for the key on 401).")
@click.option("--coordinator", "--coordinator-address", default=None, metavar="HOST:PORT",
              help="Run one program over several processes (hosts): process 0's address for jax.distributed; process "
                   "0 serves HTTP, the others follow its steps. Needs --num-processes and --process-id.")
@click.option("--num-processes", default=None, type=click.IntRange(min=2), help="Processes of one program (--coordinator).")
@click.option("--process-id", default=None, type=click.IntRange(min=0), help="This process's index (0: the leader).")
@click.option("--allowed-image-roots", multiple=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, resolve_path=True, path_type=Path),
              help="A directory whose files requests may name as images (file:// URLs, absolute paths); "
                   "repeatable [default: none: images come inline, as data URLs; remote URLs are never fetched].")
def serve(model: str | None, revision: str | None, quantization_encoding: str | None, devices: str | None,
          mmproj: Path | None, custom_architectures: tuple[str, ...], served_model_name: str | None, host: str, port: int,
          max_batch_size: int, max_length: int | None,
          device_memory_utilization: float | None, kv_cache_page_size: int, kv_cache_pages: int | None,
          prefill_chunk_size: int, overlap_scheduler: bool, max_images_per_request: int,
          compile_cache_dir: Path | None, no_compile_cache: bool, max_queue_size: int,
          chat_template: str | None, api_key: str | None, shutdown_timeout: float, tool_call_parser: str | None,
          reasoning_parser: str | None, task: str | None, web_ui: bool, coordinator: str | None,
          num_processes: int | None, process_id: int | None, allowed_image_roots: tuple[Path, ...]) -> None:
    """Serve a model behind an OpenAI-compatible API."""
    from maxjax.config import DistributedConfig, ImageLimits, PipelineConfig, ServerConfig
    from maxjax.serve.launch import run_server

    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise click.UsageError("--coordinator, --num-processes and --process-id go together")
    try:
        distributed = DistributedConfig(coordinator, num_processes, process_id) if coordinator else None  # type: ignore[arg-type]
        config = PipelineConfig(
            **_engine_configs(max_batch_size, max_length, device_memory_utilization, kv_cache_page_size,
                              kv_cache_pages, prefill_chunk_size, overlap_scheduler, max_images_per_request,
                              compile_cache_dir, no_compile_cache),
            server=ServerConfig(host=host, port=port, api_key=api_key, served_model_name=served_model_name,
                                max_queue_size=max_queue_size, shutdown_timeout=shutdown_timeout,
                                tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                                task=task, web_ui=web_ui, images=ImageLimits(allowed_roots=allowed_image_roots)),
            distributed=distributed,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    run_server(config, model=model, revision=revision, quantization_encoding=quantization_encoding, mmproj=mmproj,
               devices=devices, chat_template=chat_template, custom_architectures=custom_architectures)


@main.command(name="warm-cache")
@model_options
@mmproj_option
@custom_architectures_option
@engine_options
@compile_cache_options
def warm_cache(model: str | None, revision: str | None, quantization_encoding: str | None, devices: str | None,
               mmproj: Path | None, custom_architectures: tuple[str, ...], max_batch_size: int, max_length: int | None,
               device_memory_utilization: float | None, kv_cache_page_size: int, kv_cache_pages: int | None,
               prefill_chunk_size: int, overlap_scheduler: bool, max_images_per_request: int,
               compile_cache_dir: Path | None, no_compile_cache: bool) -> None:
    """Compile everything `max serve` with the same flags runs into the compile cache, without serving.

    A later `max serve` with the same model and flags loads the executables instead of compiling them.
    """
    from maxjax.config import PipelineConfig
    from maxjax.serve.launch import warm_cache as run

    try:
        config = PipelineConfig(**_engine_configs(max_batch_size, max_length, device_memory_utilization,
                                                  kv_cache_page_size, kv_cache_pages, prefill_chunk_size,
                                                  overlap_scheduler, max_images_per_request, compile_cache_dir,
                                                  no_compile_cache))
    except ValueError as e:
        raise UserError(str(e)) from None
    report = run(config, model=model, revision=revision, quantization_encoding=quantization_encoding, mmproj=mmproj,
                 devices=devices, custom_architectures=custom_architectures)
    click.echo(f"{report.compiled + report.cached} executables: {report.compiled} compiled, "
               f"{report.cached} already cached ({report.seconds:.1f} s)")


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@custom_architectures_option
def list_architectures(as_json: bool, custom_architectures: tuple[str, ...]) -> None:
    """The architectures maxjax serves: encodings (default first; * run in their blocks, not dequantized) and
    example models."""
    import json

    from maxjax.custom import registry_with
    from maxjax.weights.encodings import IN_BLOCKS

    registry = registry_with(custom_architectures)
    entries = [registry.get(name) for name in registry.names()]
    if as_json:
        click.echo(json.dumps({"architectures": [{
            "name": a.name,
            "default_encoding": a.default_encoding,
            "supported_encodings": list(a.supported_encodings),
            "in_blocks_encodings": list(IN_BLOCKS),
            "gguf_architectures": list(a.gguf_architectures),
            "takes_images": a.open_vision is not None,
            "example_repo_ids": list(a.example_repo_ids),
        } for a in entries]}, indent=2))
        return
    rows = [("ARCHITECTURE", "ENCODINGS", "GGUF", "EXAMPLES")] + [(
        a.name + " (+images)" * (a.open_vision is not None),
        ", ".join(e + "*" * (e in IN_BLOCKS) for e in dict.fromkeys([a.default_encoding, *a.supported_encodings,
                                                                   *IN_BLOCKS])),
        ", ".join(a.gguf_architectures) or "-",
        ", ".join(a.example_repo_ids) or "-",
    ) for a in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    click.echo("\n* multiplied in their blocks on CPU (maxjax's kernel) and GPU/TPU (dequantized beside the matmul); "
               "a float checkpoint is quantized to them at load with --quantization-encoding; (+images): takes "
               "images in chat (a GGUF with its mmproj file)")
