"""The profile section: each check against a situation the test builds (ports, GPUs, NATS, engine, model)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from dynamo.core.nats_server import nats_server_binary
from tests.check.conftest import free_port, run_check, write_profile


def mocker_profile(tmp_path, extra: str = "", frontend_port: int = 0, nats: str = "{port: 0}", name: str = "p.yaml"):
    return write_profile(tmp_path, f"""\
        name: chk
        model: {{name: fake}}
        backend: mocker
        nats: {nats}
        frontend: {{port: {frontend_port}}}
        ports: {{base: 0}}
        workers:
          w: {{replicas: 1}}
        {extra}""", name)


def test_a_port_held_by_a_test_socket_is_named_with_its_holder(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        profile = mocker_profile(tmp_path, frontend_port=port)
        check = run_check(str(profile), "--only", "profile", "--json")
    assert check.code == 1, check.stdout + check.stderr
    result = check.one("profile", "port")
    assert result["status"] == "error"
    assert f"port {port} (frontend http) is taken by pid {os.getpid()}" in result["message"]
    assert "pytest" in result["message"]
    assert "--set frontend.port=0" in result["fix"]
    assert result["data"]["port"] == port


def test_all_ports_free_and_a_clean_mocker_profile_passes(tmp_path):
    check = run_check(str(mocker_profile(tmp_path)), "--only", "profile", "--json")
    assert check.code == 0, check.stdout
    statuses = {r["name"]: r["status"] for r in check.results("profile")}
    assert statuses["valid"] == "ok" and statuses["ports"] == "ok" and statuses["engine"] == "ok"
    assert statuses["gpus needed"] == "ok" and statuses["nats"] == "ok"
    assert statuses["model"] == "info"  # the mocker runs without model files


def test_a_missing_engine_is_an_error_with_the_install_hint(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    profile = write_profile(tmp_path, """\
        name: v
        model: {name: fake}
        backend: vllm
        nats: {port: 0}
        frontend: {port: 0}
        ports: {base: 0}
        workers:
          w: {replicas: 1, gpus: 1}
        """)
    check = run_check(str(profile), "--only", "profile", "--json", "--assume-gpus", "1")
    assert check.code == 1
    engine = check.one("profile", "engine")
    assert engine["status"] == "error"
    assert "vLLM is not installed" in engine["message"]
    assert "--backend mocker" in engine["fix"]
    # with the mocker the same profile needs no engine and no GPU
    mocker = run_check(str(profile), "--only", "profile", "--json", "--backend", "mocker")
    assert mocker.one("profile", "engine")["status"] == "ok"
    assert mocker.one("profile", "gpus needed")["message"] == "backend mocker needs no GPU"


def test_a_profile_needing_8_gpus_with_none_present(tmp_path):
    profile = write_profile(tmp_path, """\
        name: big
        model: {name: fake}
        backend: vllm
        nats: {port: 0}
        frontend: {port: 0}
        ports: {base: 0}
        workers:
          decode: {replicas: 2, gpus: 4}
        """)
    check = run_check(str(profile), "--only", "profile,gpus", "--json", env={"DYNAMO_ASSUME_GPUS": ""})
    assert check.code == 1
    needed = check.one("profile", "gpus needed")
    assert needed["status"] == "error"
    assert "needs 8 GPUs" in needed["message"] and "no NVIDIA GPU" in needed["message"]
    assert "--backend mocker" in needed["fix"]
    assert needed["data"] == {"needed": 8, "available": 0, "assumed": False}
    # the GPU section says it once, as an error because this profile needs GPUs
    nvidia = check.one("gpus", "nvidia")
    assert nvidia["status"] == "error" and "needs 8" in nvidia["message"]
    # the rest of the plan is still checked, as if the GPUs were there
    assert check.one("profile", "ports")["status"] == "ok"
    # and planning for a machine with 8 GPUs passes the GPU check
    assumed = run_check(str(profile), "--only", "profile", "--json", "--assume-gpus", "8")
    assert assumed.one("profile", "gpus needed")["status"] == "ok"
    assert "8 (assumed) available" in assumed.one("profile", "gpus needed")["message"]


def test_without_a_profile_no_gpu_is_one_info_line():
    check = run_check("--only", "gpus", "--json", env={"DYNAMO_ASSUME_GPUS": ""})
    nvidia = check.results("gpus", "nvidia")
    if not nvidia:
        pytest.skip("this machine has NVIDIA GPUs")
    assert len(nvidia) == 1 and nvidia[0]["status"] == "info"


def test_an_unreachable_nats_url_is_an_error_quickly(tmp_path):
    port = free_port()  # nothing listens there
    profile = mocker_profile(tmp_path, nats=f"nats://127.0.0.1:{port}")
    check = run_check(str(profile), "--only", "profile", "--json")
    assert check.code == 1
    nats = check.one("profile", "nats")
    assert nats["status"] == "error"
    assert f"cannot reach NATS at nats://127.0.0.1:{port}" in nats["message"]
    assert "connection refused" in nats["message"]
    assert "nats-server -js" in nats["fix"]
    assert check.report["seconds"] < 1.0  # refused at once, no waiting


def test_something_that_is_not_nats_is_told_apart(tmp_path):
    # a listener that accepts but never greets: the probe gives up after its short timeout
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        profile = mocker_profile(tmp_path, nats=f"nats://user:secret@127.0.0.1:{port}")
        check = run_check(str(profile), "--only", "profile", "--json")
    nats = check.one("profile", "nats")
    assert nats["status"] == "error" and "timed out" in nats["message"]
    assert "secret" not in check.stdout  # credentials never appear in the report
    assert check.report["seconds"] < 2.0  # the 1 s probe timeout, not a hang


@pytest.mark.skipif(nats_server_binary() is None, reason="nats-server is not installed")
@pytest.mark.parametrize("jetstream", [True, False])
def test_a_reachable_external_nats_and_whether_jetstream_is_on(tmp_path, jetstream):
    port = free_port()
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    server = subprocess.Popen(argv + (["-js"] if jetstream else []), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        check = run_check(str(mocker_profile(tmp_path, nats=f"nats://127.0.0.1:{port}")), "--only", "profile",
                          "--json")
    finally:
        server.terminate()
        server.wait(5)
    nats = check.one("profile", "nats")
    if jetstream:
        assert nats["status"] == "ok" and "JetStream on" in nats["message"], nats
        assert nats["data"]["version"].startswith("2.")
    else:
        assert nats["status"] == "error" and "JetStream is off" in nats["message"]
        assert "-js" in nats["fix"]


def test_an_invalid_profile_is_reported_with_file_line_and_column(tmp_path):
    profile = write_profile(tmp_path, """\
        name: bad
        model: {name: fake}
        workers:
          w: {replicas: 1, gpu: 1}
        """)
    check = run_check(str(profile), "--only", "profile", "--json")
    assert check.code == 1
    valid = check.one("profile", "valid")
    assert valid["status"] == "error"
    assert any(f"{profile}:4:" in line and "did you mean 'gpus'" in line for line in valid["details"]), valid


def test_a_profile_that_does_not_exist_is_a_usage_error(tmp_path):
    check = run_check(str(tmp_path / "nope.yaml"))
    assert check.code == 2
    assert "no such file" in check.stderr and "Traceback" not in check.stderr


@pytest.mark.parametrize("args, message", [
    (["--only", "disk"], "unknown section"),
    (["--url", "ftp://localhost:8000"], "the scheme must be http or https"),  # HOST:PORT alone is fine, as in bench
])
def test_usage_errors_exit_2(args, message):
    check = run_check(*args)
    assert check.code == 2 and message in check.stderr


def _model_profile(tmp_path, path: str, backend: str = "vllm") -> str:
    return str(write_profile(tmp_path, f"""\
        name: m
        model: {{name: tiny, path: {path}}}
        backend: {backend}
        nats: {{port: 0}}
        frontend: {{port: 0}}
        ports: {{base: 0}}
        workers:
          w: {{replicas: 1, gpus: 1}}
        """, "m.yaml"))


def _model_files(directory, tokenizer: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (directory / "model.safetensors").write_bytes(b"\0" * 1024)
    if tokenizer:
        (directory / "tokenizer.json").write_text("{}")


def test_a_local_model_directory_with_weights_and_tokenizer(tmp_path):
    _model_files(tmp_path / "tiny")
    check = run_check(_model_profile(tmp_path, str(tmp_path / "tiny")), "--only", "profile", "--json",
                      "--assume-gpus", "1")
    model = check.one("profile", "model")
    assert model["status"] == "ok" and "tokenizer tokenizer.json" in model["message"]


def test_a_model_directory_without_tokenizer_is_an_error_for_an_engine(tmp_path):
    _model_files(tmp_path / "tiny", tokenizer=False)
    check = run_check(_model_profile(tmp_path, str(tmp_path / "tiny")), "--only", "profile", "--json",
                      "--assume-gpus", "1")
    model = check.one("profile", "model")
    assert model["status"] == "error" and "missing tokenizer" in model["message"]


def test_a_missing_local_path_is_an_error(tmp_path):
    check = run_check(_model_profile(tmp_path, str(tmp_path / "nowhere")), "--only", "profile", "--json",
                      "--assume-gpus", "1")
    model = check.one("profile", "model")
    assert model["status"] == "error" and "no such directory" in model["message"]


def test_a_hub_model_found_in_the_hugging_face_cache(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    _model_files(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    found = run_check(_model_profile(tmp_path, "acme/tiny"), "--only", "profile", "--json", "--assume-gpus", "1",
                      env=env)
    model = found.one("profile", "model")
    assert model["status"] == "ok" and "acme/tiny in the Hugging Face cache" in model["message"]
    # not cached and offline: the engine could not get it
    missing = run_check(_model_profile(tmp_path, "acme/other"), "--only", "profile", "--json", "--assume-gpus", "1",
                        env=env)
    model = missing.one("profile", "model")
    assert model["status"] == "error" and "HF_HUB_OFFLINE" in model["message"]
    assert "hf download acme/other" in model["fix"]
