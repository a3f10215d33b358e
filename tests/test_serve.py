"""``lr2kernels serve``: transformers' OpenAI-compatible server on the lr2kernels attention.

Over HTTP on loopback, the embedded SmolLM2 saved as a folder: ``lr2kernels serve`` answers a chat completion
(temperature 0) exactly as ``transformers serve`` does on the same folder; with ``--table`` and continuous batching,
exactly as ``transformers serve --continuous-batching`` does on a folder whose config holds that table. Each pair of
servers runs at once, in processes of their own (each spawns its model's process), bounded in time, and stopped
(their process groups killed) whatever happens. The usage errors and the options' plumbing are checked without
starting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import lr2kernels as lr2
from lr2kernels.apps import cli
from lr2kernels.apps import serve as serve_app

READY_SECONDS = 600  # a server's start: imports, its model process, the weights (minutes on a loaded 2-core CI)
ANSWER_SECONDS = 300  # one 8-token answer, first request included
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LINEAR = 2.0  # the table test's RoPE: SmolLM2's own with positions / 2 (it changes the model's answer)
# Continuous batching on the CPU sizes its paged cache from the free memory (gigabytes per server) unless told: 1024
# tokens are plenty for one short chat.
SMALL_CACHE = ("--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks", "32",
               "--cb-max-batch-tokens", "256")  # fmt: skip

needs_serve = pytest.mark.skipif(
    serve_app._serve_command() is None, reason="lr2kernels serve needs transformers >= 5.25 (transformers serve)"
)


# ---- the servers ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server started with ``argv`` on 127.0.0.1 and a free port, in a process group of its own (its model's
    process joins it), its output in ``log``."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.port, self.log = _free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [*argv, "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server stopped (exit code {self.process.returncode}):\n{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        pytest.fail(f"the server was not ready after {READY_SECONDS} s:\n{self.output()[-4000:]}")

    def chat(self, model: str) -> dict:
        body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 8, "stream": False}
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=ANSWER_SECONDS) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            pytest.fail(f"HTTP {error.code}: {error.read()[:2000]!r}\n{self.output()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM to the whole group (the server stops its model's process), SIGKILL after 30 s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left (the model's process)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@contextlib.contextmanager
def servers(*commands: tuple[list[str], Path]):
    """The servers, started at once and ready; always stopped."""
    started: list[Server] = []
    try:
        for argv, log in commands:
            started.append(Server(argv, log))
        deadline = time.monotonic() + READY_SECONDS
        for server in started:
            server.wait_ready(deadline)
        yield started
    finally:
        for server in started:
            server.stop()


def lr2kernels_serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "lr2kernels", "serve", *args]


def transformers_serve(*args: str) -> list[str]:
    # transformers' CLI app itself (its console script's main() also checks PyPI for a newer version)
    return [sys.executable, "-c", "from transformers.cli.transformers import app; app()", "serve", *args]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(SmolLM2 saved as a folder, the same with its RoPE positions / 2 in config.json, that RoPE as a table.json)."""
    from tests.models import load_smollm2

    root = tmp_path_factory.mktemp("serve")
    model, tokenizer = load_smollm2()
    plain = root / "smollm2"
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    del model
    linear = root / "smollm2-linear"
    linear.mkdir()
    for path in plain.iterdir():
        if path.name != "config.json":
            (linear / path.name).symlink_to(path)
    config = json.loads((plain / "config.json").read_text())
    theta = config["rope_parameters"]["rope_theta"]
    config["rope_parameters"] = {"rope_type": "linear", "factor": LINEAR, "rope_theta": theta}
    (linear / "config.json").write_text(json.dumps(config, indent=2))
    lr2.RopeTable.from_hf_config(config).save(root / "table.json")
    return plain, linear, root / "table.json"


def _answer(reply: dict) -> tuple[str, int]:
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]


# ---- over HTTP -----------------------------------------------------------------------------------------------------


@needs_serve
@pytest.mark.slow
def test_serve_answers_as_transformers_serve(folders, tmp_path):
    plain, _, _ = folders
    with servers(
        (lr2kernels_serve(str(plain)), tmp_path / "lr2kernels.log"),
        (transformers_serve(str(plain)), tmp_path / "transformers.log"),
    ) as (ours, stock):
        answer, expected = _answer(ours.chat(str(plain))), _answer(stock.chat(str(plain)))
        log = ours.output()
    assert answer == expected, (answer, expected)
    assert expected[1] == 8 and expected[0].strip()  # 8 tokens of text: a real answer, not an empty one
    assert f"lr2kernels serve: {plain} (LlamaForCausalLM) runs the lr2kernels attention" in log  # the model's process


@needs_serve
@pytest.mark.slow
def test_serve_with_a_table_and_continuous_batching(folders, tmp_path):
    """--table runs the searched table instead of the model's RoPE: the answers of the stock model whose config
    holds that table, which differ from the model's own (so a table left unused fails the test)."""
    plain, linear, table = folders
    with servers(
        (lr2kernels_serve(str(plain), "--table", str(table), *SMALL_CACHE), tmp_path / "lr2kernels.log"),
        (transformers_serve(str(linear), *SMALL_CACHE), tmp_path / "transformers.log"),
    ) as (ours, stock):
        answer, expected = _answer(ours.chat(str(plain))), _answer(stock.chat(str(linear)))
        log = ours.output()
    assert answer == expected, (answer, expected)
    assert f"with the table {table}" in log
    assert expected[1] == 8 and expected[0] != "The capital of France is Paris."  # the model's own (test above)


# ---- before anything starts ----------------------------------------------------------------------------------------


@pytest.fixture
def nothing_runs(monkeypatch):
    def started(*args, **kwargs):
        pytest.fail("the server started before the usage error")

    monkeypatch.setattr(serve_app, "run", started)


def _usage_error(argv: list[str], capsys) -> str:
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", *argv])
    assert stop.value.code == 2 and time.perf_counter() - start < 10
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    message = captured.err.strip().splitlines()[-1]
    assert message.startswith("lr2kernels serve: error: "), message
    return message


@pytest.fixture
def model_folders(tmp_path):
    """A llama folder (config only: head_dim 16), a gpt2 one, a table for another head size."""
    llama, gpt2 = tmp_path / "llama", tmp_path / "gpt2"
    for folder, config in ((llama, {"model_type": "llama", "max_position_embeddings": 256, "hidden_size": 64,
                                    "num_attention_heads": 4, "head_dim": 16, "rope_theta": 10000.0}),
                           (gpt2, {"model_type": "gpt2"})):  # fmt: skip
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    lr2.RopeTable.default(head_dim=64, base=1e4, max_position=256).save(tmp_path / "wide.json")
    return tmp_path


@needs_serve
@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["{tmp}/llama", "--table", "{tmp}/nowhere"], "--table: expected a table.json or a folder holding one"),
        (["{tmp}/llama", "--table", "{tmp}/wide.json"], "--table .*: expected a table for head_dim 16 / rotary_dim 16"),
        (["--table", "{tmp}/wide.json"], "--table: a table is for one model; expected MODEL too"),
        (["{tmp}/gpt2"], "MODEL: .*gpt2 is a 'gpt2' model; lr2kernels serves the model types"),
        (["{tmp}/llama", "--backend", "tpu"], "--backend: expected torch, triton or cuda, got 'tpu'"),
        (["{tmp}/llama", "--attn-implementation", "sdpa"], "--attn-implementation: invalid choice: 'sdpa'"),
        (["{tmp}/llama", "--port", "http"], "--port: invalid int value: 'http'"),
        (["{tmp}/llama", "--reasoning", "maybe"], "--reasoning: invalid choice: 'maybe'"),
    ],
)
def test_a_bad_value_stops_at_once_with_one_line_naming_it(argv, pattern, model_folders, nothing_runs, capsys):
    import re

    message = _usage_error([arg.replace("{tmp}", str(model_folders)) for arg in argv], capsys)
    assert re.search(pattern, message), message


def test_without_transformers_serve_it_says_what_to_install(monkeypatch, nothing_runs, capsys):
    monkeypatch.setattr(serve_app, "_serve_command", lambda: None)
    monkeypatch.setattr(serve_app, "_transformers_version", lambda: (5, 24))
    message = _usage_error(["smollm2"], capsys)
    assert "needs transformers >= 5.25 (its serve command), got transformers 5.24" in message
    assert "pip install 'lr2kernels[serve]'" in message


@needs_serve
def test_every_transformers_serve_option_is_passed_through(model_folders, monkeypatch):
    """Each of transformers serve's options reaches its command as given, under its own name; the loader it builds
    is lr2kernels' for the time it runs, and transformers' again after."""
    from transformers.cli.serving import model_manager

    from lr2kernels.apps.serve_loader import Lr2ModelLoader

    seen = {}

    def command(**kwargs):
        seen.update(kwargs, loader=model_manager.ModelLoader, table=Lr2ModelLoader.default_table)

    real = serve_app._serve_command()
    command.__init__ = real.__init__  # run() reads the parameters from command.__init__: the real command's
    original = model_manager.ModelLoader
    folder = str(model_folders / "llama")
    argv = [folder, "--port", "1234", "--continuous-batching", "--reasoning", "off", "--cb-block-size", "32",
            "--no-cb-use-cuda-graph", "--cb-max-memory-percent", "0.5", "--dtype", "float32", "--device", "cpu",
            "--api-server-count", "2", "--backend", "torch"]  # fmt: skip
    args = serve_app.build_parser(real).parse_args(argv)
    assert serve_app.run(args, command) == 0
    from transformers.cli.serve import ReasoningMode

    expected = dict(force_model=folder, port=1234, continuous_batching=True, reasoning=ReasoningMode.OFF,
                    cb_block_size=32, cb_use_cuda_graph=False, cb_max_memory_percent=0.5, dtype="float32",
                    device="cpu", api_server_count=2, host="localhost", compile=False,
                    attn_implementation=None)  # fmt: skip
    assert {key: seen[key] for key in expected} == expected
    assert seen["loader"] is Lr2ModelLoader and model_manager.ModelLoader is original
    parameters = [name for name in serve_app.inspect.signature(real.__init__).parameters if name != "self"]
    assert set(parameters) <= set(seen)  # every one of them, none left out


@needs_serve
def test_the_loader_pickles_with_its_table_and_backend(tmp_path):
    """The model's process gets the loader pickled: it keeps the table, the backend and the attention."""
    from lr2kernels.apps.serve_loader import Lr2ModelLoader

    Lr2ModelLoader.default_table, Lr2ModelLoader.default_backend = str(tmp_path / "table.json"), "torch"
    try:
        loader = Lr2ModelLoader(device="cpu", attn_implementation="sdpa")
    finally:
        Lr2ModelLoader.default_table = Lr2ModelLoader.default_backend = None
    copy = pickle.loads(pickle.dumps(loader))
    assert type(copy) is Lr2ModelLoader
    assert (copy.table, copy.backend, copy.attn_implementation) == (str(tmp_path / "table.json"), "torch", "lr2kernels")
