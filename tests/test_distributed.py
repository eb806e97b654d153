"""Two processes, one program: `max serve --coordinator 127.0.0.1:P --num-processes 2 --process-id 0|1` on the
CPU backend, one CPU device each (XLA's collectives over Gloo). Process 0 serves HTTP and sends every step to
process 1 (`serve/distributed.py`); the model is tensor parallel over both processes' devices. One request
through the `openai` client gets the greedy text of one process alone, and the follower ran the same steps.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from maxjax.cli import main
from maxjax.config import DistributedConfig
from maxjax.generate import generate
from maxjax.serve.protocol import SamplingParams
from tests.serve_helpers import MAX, free_port, max_serve
from tests.test_architectures import FIXTURES as ARCH


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device a process
    return env


def serve_once(tmp_path: Path, prompt: str, start: int) -> tuple[str, str, str]:
    """Leader and follower of one program on 127.0.0.1, one completion: (its text, the leader's log, the
    follower's)."""
    coordinator = f"127.0.0.1:{free_port()}"
    flags = ["--model", str(ARCH / "llama"), "--devices", "cpu", "--served-model-name", "tiny", "--max-length", "64",
             "--max-batch-size", "2", "--prefill-chunk-size", "16", "--kv-cache-pages", "16",
             "--compile-cache-dir", str(tmp_path / "cache"), "--coordinator", coordinator, "--num-processes", "2"]
    follower_log, leader_log = tmp_path / f"follower{start}.log", tmp_path / f"leader{start}.log"
    with follower_log.open("w") as out:
        follower = subprocess.Popen([MAX, "serve", *flags, "--process-id", "1"], stdout=out,
                                    stderr=subprocess.STDOUT, env=_env())
    try:
        with max_serve([*flags, "--process-id", "0"], leader_log, env=_env(), timeout=240) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert follower.wait(timeout=60) == 0, follower_log.read_text()[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
    return reply.choices[0].text, leader_log.read_text(), follower_log.read_text()


def test_two_processes_serve_one_request_end_to_end(tmp_path: Path) -> None:
    prompt = "The quick brown fox"
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = generate(model=str(ARCH / "llama"), prompt=prompt, chat=False, params=params, devices="cpu", stream=False)
    text, leader, follows = serve_once(tmp_path, prompt, 0)
    assert text == want.text, (text, want.text)
    assert "tensor parallel over 2 cpu devices" in leader and "process 0 of 2" in leader
    assert "process 1 following the leader" in follows and "the leader stopped after" in follows, follows[-3000:]
    # Again, from the compile cache both filled (each process keeps its own executables: their keys name it).
    text, leader, follows = serve_once(tmp_path, prompt, 1)
    assert text == want.text
    for log in (leader, follows):
        assert "0 compiled, 4 found in the compile cache" in log, log[-3000:]


def test_the_three_flags_go_together() -> None:
    result = CliRunner().invoke(main, ["serve", "--coordinator", "127.0.0.1:1234", "--process-id", "0"])
    assert result.exit_code == 2 and "go together" in result.output


@pytest.mark.parametrize(("value", "words"), [
    (("127.0.0.1", 2, 0), "HOST:PORT"), (("h:1", 1, 0), "at least 2"), (("h:1", 2, 2), "0 to 1"),
])
def test_bad_distributed_flags_are_named(value: tuple[str, int, int], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        DistributedConfig(*value)
