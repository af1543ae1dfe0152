"""Fixtures that start real mocker processes and always stop them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

READY = "Mocker ready on http://"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockerProcess:
    """One ``python -m dynamo.backends.mocker`` subprocess."""

    def __init__(self, args: list[str], tmp: Path, name: str = "mocker") -> None:
        self.port = _free_port()
        self.args = ["--port", str(self.port), *args]
        if "--served-model-name" not in args:
            self.args += ["--served-model-name", "mock"]
        self.stderr_path = tmp / f"{name}-{self.port}.stderr"
        self.proc: subprocess.Popen | None = None
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> "MockerProcess":
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo.backends.mocker", *self.args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            if READY in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mocker exited with {self.proc.returncode}: {self.stderr()}")
        raise TimeoutError(f"mocker not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()
        return self.proc.returncode


@pytest.fixture
def start_mocker(tmp_path):
    """``start_mocker(*flags)`` starts a mocker; all are stopped at teardown."""
    procs: list[MockerProcess] = []

    def start(*args: str, wait_ready: bool = True, name: str = "mocker") -> MockerProcess:
        m = MockerProcess(list(args), tmp_path, name)
        procs.append(m)
        return m.start(wait_ready=wait_ready)

    yield start
    for m in procs:
        m.stop()


def shared_mocker(tmp_path_factory, model: str = "mock", *flags: str):
    """A mocker for a module's tests (a generator for module-scoped fixtures): stopped at teardown."""
    m = MockerProcess([*flags, "--served-model-name", model], tmp_path_factory.mktemp("mocker"))
    try:
        m.start()
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def fast_mocker(tmp_path_factory):
    """One shared mocker without simulated delays (for tests that only check the API)."""
    yield from shared_mocker(tmp_path_factory, "mock", "--speedup-ratio", "0")


@pytest.fixture(scope="module")
def slow_mocker(tmp_path_factory):
    """One shared mocker with slow steps (speedup 0.5): a long request is surely in flight."""
    yield from shared_mocker(tmp_path_factory, "mock", "--speedup-ratio", "0.5")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained on the spot, plus a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world from the mocker engine"] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(d / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    return d


def _scrape(url: str) -> dict[str, float]:
    """Samples of a Prometheus text page as {"name{labels}": value} plus bare names summed."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _get_json(url: str) -> dict:
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(url, timeout=5).read())


@pytest.fixture(scope="session")
def scrape():
    """``scrape(url)``: the mocker's /metrics as {sample name: summed value}."""
    return _scrape


@pytest.fixture(scope="session")
def get_json():
    """``get_json(url)``: GET and decode a JSON document."""
    return _get_json


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a currently unused TCP port on 127.0.0.1."""
    return _free_port
