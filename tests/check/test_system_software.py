"""System and software sections, against situations the tests build (ulimits, fake engine packages)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.check.conftest import run_check


def test_system_section_reports_every_item(tmp_path):
    check = run_check("--only", "system", "--json", env={"DYNAMO_HOME": str(tmp_path / "home")})
    names = {r["name"] for r in check.results("system")}
    assert {"os", "cpu", "memory", "/dev/shm", "ulimit nofile", "ulimit memlock", "disk (runs)",
            "disk (model cache)", "container", "user"} <= names
    memory = check.one("system", "memory")["data"]
    assert memory["total_bytes"] > 0 and 0 <= memory["used_fraction"] <= 1
    disk = check.one("system", "disk (runs)")
    assert disk["data"]["path"] == str(tmp_path / "home" / "runs")


def test_a_low_open_files_limit_is_a_warning_with_the_fix(tmp_path):
    # the check, run from a shell that lowered the limit
    proc = subprocess.run(["bash", "-c", f"ulimit -n 1024 && exec {sys.executable} -m dynamo.cli.check "
                                         "--only system --json"], capture_output=True, text=True, timeout=30)
    results = {r["name"]: r for s in json.loads(proc.stdout)["sections"] for r in s["results"]}
    nofile = results["ulimit nofile"]
    assert nofile["status"] == "warn" and "open files 1024" in nofile["message"]
    assert "ulimit -n 65536" in nofile["fix"]


def test_a_dynamo_home_that_cannot_be_created_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check = run_check("--only", "system", "--json", env={"DYNAMO_HOME": str(blocker / "home")})
    assert check.code == 1
    result = check.one("system", "runs writable")
    assert result["status"] == "error" and f"{blocker} is a file" in result["message"]
    assert "DYNAMO_HOME" in result["fix"]


def test_a_dynamo_home_where_nothing_can_be_created_is_an_error_even_for_root():
    # /proc takes no new directories, though os.access says root may write there
    check = run_check("--only", "system", "--json", env={"DYNAMO_HOME": "/proc/dynamo-home"})
    assert check.code == 1
    result = check.one("system", "runs writable")
    assert result["status"] == "error" and "cannot create a directory in /proc" in result["message"]


def _fake_package(site, name: str, dist: str, version: str, body: str) -> None:
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(textwrap.dedent(body))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def test_engines_versions_import_times_broken_and_slow_imports(tmp_path):
    site = tmp_path / "site"
    _fake_package(site, "sglang", "sglang", "0.5.23", "import time\ntime.sleep(0.05)\n")
    _fake_package(site, "tensorrt_llm", "tensorrt-llm", "1.2.0", "raise ImportError('libcuda.so.1: cannot open')\n")
    _fake_package(site, "nixl", "nixl", "1.5.1", "import time\ntime.sleep(30)\n")
    check = run_check("--only", "software", "--json", env={"PYTHONPATH": str(site)})
    assert check.report["seconds"] < 2.0  # the slow import was abandoned at 1.5 s, not waited for
    sglang = check.one("software", "sglang")
    assert sglang["status"] == "ok" and sglang["message"].startswith(f"sglang 0.5.23 at {site / 'sglang'}, imports in 0.")
    assert sglang["data"]["import_seconds"] >= 0.05
    trt = check.one("software", "tensorrt_llm")
    assert trt["status"] == "warn" and "does not import: ImportError: libcuda.so.1" in trt["message"]
    nixl = check.one("software", "nixl")
    assert "imports in over 1.5s (not timed further)" in nixl["message"] and nixl["data"]["import_seconds"] is None
    assert check.one("software", "vllm")["message"] == "not installed (engine)"
    assert not check.results("software", "engines")  # an engine is installed now
    assert check.one("software", "python")["status"] == "ok"
    assert check.one("software", "nats-server")["status"] in ("ok", "warn")


def test_dynamo_itself_is_reported_with_its_version():
    check = run_check("--only", "software", "--json")
    dynamo = check.one("software", "dynamo")
    assert dynamo["status"] == "ok" and dynamo["data"]["distribution"] == "dynamo-launcher"


def test_torch_and_whether_it_sees_cuda(tmp_path):
    site = tmp_path / "site"
    _fake_package(site, "torch", "torch", "2.13.0", """\
        class cuda:
            @staticmethod
            def is_available():
                return False

            @staticmethod
            def device_count():
                return 0

        class version:
            cuda = None
        """)
    check = run_check("--only", "software", "--json", env={"PYTHONPATH": str(site), "DYNAMO_ASSUME_GPUS": ""})
    torch = check.one("software", "torch")
    assert torch["data"]["cuda_available"] is False and torch["data"]["import_seconds"] is not None
    from dynamo.core.gpus import nvml_inventory

    if nvml_inventory().count == 0:  # no GPU: not seeing CUDA is fine
        assert torch["status"] == "ok" and "no CUDA" in torch["message"]


def test_the_cuda_torch_was_built_for_is_read_from_its_version():
    from dynamo.core.check.software import torch_cuda_build

    assert torch_cuda_build("2.7.0+cu128") == "12.8"
    assert torch_cuda_build("2.5.1+cu121") == "12.1"
    assert torch_cuda_build("2.13.0+cpu") is None
