"""Profiles: valid ones load; every kind of bad input names file:line, the key path, and exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo.core.errors import ProfileError
from dynamo.core.profile import SHIPPED_PROFILES_DIR, load_profile, parse_profile, profile_json_schema
from tests.conftest import dynamo

MINIMAL = "name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: 1}\n"


def problems(text: str, **kwargs) -> str:
    with pytest.raises(ProfileError) as info:
        parse_profile(text, "p.yaml", **kwargs)
    return str(info.value)


def test_minimal_profile_gets_defaults():
    profile = parse_profile(MINIMAL, env={}).profile
    assert profile.backend == "vllm"
    assert profile.nats.embedded and profile.nats.port == 4222
    assert profile.frontend.port == 8000
    assert profile.workers["w"].role == "agg" and profile.workers["w"].gpus == 1
    assert profile.restart.policy == "on-failure"


def test_variables_expand_with_defaults_and_types():
    text = "name: p\nmodel: {name: ${MODEL}}\nfrontend: {port: ${PORT:-8123}}\nworkers:\n  w: {replicas: ${N}}\n"
    profile = parse_profile(text, env={"MODEL": "qwen", "N": "3"}).profile
    assert profile.model.name == "qwen"
    assert profile.frontend.port == 8123
    assert profile.workers["w"].replicas == 3


def test_dollar_dollar_is_a_literal_dollar():
    profile = parse_profile("name: p\nmodel: {name: a$$b}\nworkers: {w: {}}\n", env={}).profile
    assert profile.model.name == "a$b"


def test_undefined_variable_names_line_and_variable():
    message = problems("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: ${REPLICAS}}\n", env={})
    assert "p.yaml:4:17" in message and "${REPLICAS} is not set" in message


def test_set_overrides_values_and_sections():
    loaded = parse_profile(MINIMAL, env={}, overrides=["frontend.port=9000", "workers.w.replicas=4", "nats.port=0",
                                                       "workers.w.gpus=[0,1,2,3]"])
    profile = loaded.profile
    assert profile.frontend.port == 9000
    assert profile.workers["w"].replicas == 4
    assert profile.nats.port == 0
    assert profile.workers["w"].gpus == [0, 1, 2, 3]


def test_error_from_an_override_names_the_flag():
    message = problems(MINIMAL, env={}, overrides=["frontend.port=-1"])
    assert "--set frontend.port" in message


def test_backend_override():
    assert parse_profile(MINIMAL, env={}, backend="mocker").profile.backend == "mocker"
    assert "did you mean 'mocker'" in problems(MINIMAL, env={}, backend="moker")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: p\nmodel: {name: m\nworkers: {}\n", ["p.yaml:3:8", "malformed YAML"]),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: two}\n", ["p.yaml:4:17", "workers.w.replicas", "integer"]),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {replica: 2}\n", ["p.yaml:4:7", "workers.w.replica", "did you mean 'replicas'"]),
        ("name: p\nworkers:\n  w: {}\n", ["model", "required key is missing"]),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: -1}\n", ["workers.w.replicas", "greater than or equal to 0"]),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {gpus: [0, 1, 0]}\n", ["workers.w.gpus", "GPU id 0 is listed twice"]),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: 2, gpus: [0, 1, 2]}\n", ["cannot be split evenly"]),
        ("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: 2, gpus: [3]}\n", ["1 GPU id cannot be split evenly"]),
        ("name: p\nmodel: {name: m}\nrouter: {mode: fastest}\nworkers: {w: {}}\n", ["p.yaml:3:16", "router.mode"]),
        ("name: p\nmodel: {name: m}\nrestart: {backoff: {initial: soon}}\nworkers: {w: {}}\n", ["restart.backoff.initial", "duration"]),
        ("name: p\nmodel: {name: m}\nnats: redis://x\nworkers: {w: {}}\n", ["nats", "nats:// URL"]),
        ("- just\n- a list\n", ["a profile is a YAML mapping"]),
        ("name: p\nmodel: {name: m}\nworkers: {w: {}}\nfrontnd: {port: 1}\n", ["p.yaml:4:1", "did you mean 'frontend'"]),
    ],
)
def test_bad_profiles_are_explained(text, expected):
    message = problems(text, env={})
    for part in expected:
        assert part in message, message


def test_every_problem_is_reported_at_once():
    message = problems("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: -1, gpu: 1}\n", env={})
    assert "replicas" in message and "did you mean 'gpus'" in message


def test_cli_validate_reports_and_exits_2(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: -1}\n")
    result = dynamo("profile", "validate", str(bad))
    assert result.returncode == 2
    assert f"{bad}:4:17: workers.w.replicas" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_judges_engine_arguments_as_serve_does(tmp_path: Path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: p\nmodel: {name: m}\nbackend: mocker\nworkers:\n  w: {args: {max-num-seq: 5}}\n")
    reserved = tmp_path / "reserved.yaml"
    reserved.write_text("name: p\nmodel: {name: m}\nbackend: mocker\nworkers:\n  w: {args: {port: 5}}\n")
    value = tmp_path / "value.yaml"
    value.write_text("name: p\nmodel: {name: m}\nbackend: mocker\nworkers:\n  w:\n    replicas: 2\n"
                     "    args:\n      max-num-seqs: abc\n")
    result = dynamo("profile", "validate", str(typo), str(reserved), str(value))
    assert result.returncode == 2, result.stdout
    # each problem says where its key is, once however many replicas share it
    assert result.stderr.splitlines() == [
        f"error: {typo}:5:14: workers.w.args.max-num-seq: mocker has no flag --max-num-seq; did you mean 'max-num-seqs'?",
        f"error: {reserved}:5:14: workers.w.args.port: the launcher sets --port itself; use workers.<group>.port or "
        "ports.base in the profile instead",
        f"error: {value}:8:7: workers.w.args.max-num-seqs: the mocker rejects the planned flags: argument "
        "--max-num-seqs: expected a positive integer, got 'abc'"], result.stderr
    several = tmp_path / "several.yaml"
    several.write_text("name: p\nmodel: {name: m}\nbackend: mocker\nworkers:\n"
                       "  p: {role: prefill, args: {max-num-seq: 8, port: 9000}}\n"
                       "  d: {role: decode, replicas: 2, args: {speedup-ratoi: 0}}\n")
    result = dynamo("profile", "validate", str(several))  # every problem at once, not one per try
    assert [line.split(": ")[2] for line in result.stderr.splitlines()] == [
        "workers.p.args.max-num-seq", "workers.p.args.port", "workers.d.args.speedup-ratoi"], result.stderr
    dashed = tmp_path / "dashed.yaml"
    dashed.write_text(value.read_text().replace("max-num-seqs: abc", "--max-num-seqs: abc"))
    result = dynamo("profile", "validate", str(dashed))  # the key as written, however it is spelt
    assert f"error: {dashed}:8:7: workers.w.args.--max-num-seqs: the mocker rejects" in result.stderr, result.stderr
    result = dynamo("serve", str(value), "--dry-run")
    assert result.returncode == 2 and f"error: {value}:8:7: workers.w.args.max-num-seqs: the mocker" in result.stderr
    for args in (["profile", "validate", "agg"], ["serve", "agg", "--dry-run"]):  # the engine's parser judges values
        result = dynamo(*args, "--backend", "mocker", "--set", "workers.decode.args.max-num-seqs=abc")
        assert result.returncode == 2, result.stderr
        assert "error: --set workers.decode.args.max-num-seqs: the mocker rejects the planned flags: argument " \
               "--max-num-seqs: expected a positive integer, got 'abc'" in result.stderr, result.stderr


def test_cli_validate_shipped_profiles():
    names = [p.stem for p in SHIPPED_PROFILES_DIR.glob("*.yaml")]
    assert "agg" in names
    result = dynamo("profile", "validate", *names)
    assert result.returncode == 0, result.stderr


def test_every_shipped_profile_loads_with_the_mocker():
    for path in SHIPPED_PROFILES_DIR.glob("*.yaml"):
        assert load_profile(path, backend="mocker").profile.backend == "mocker"


def test_committed_schema_is_current():
    committed = json.loads((SHIPPED_PROFILES_DIR / "schema.json").read_text())
    assert committed == profile_json_schema(), "run: dynamo profile schema -o profiles/schema.json"


def test_schema_accepts_durations_as_strings():
    schema = profile_json_schema()
    backoff = schema["$defs"]["Backoff"]["properties"]["initial"]
    assert any(option.get("type") == "string" for option in backoff["anyOf"])


def test_a_local_directory_does_not_shadow_a_shipped_profile(tmp_path: Path):
    (tmp_path / "agg").mkdir()
    result = dynamo("profile", "validate", "agg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{SHIPPED_PROFILES_DIR / 'agg.yaml'}: ok" in result.stdout
    result = dynamo("serve", "agg", "--backend", "mocker", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_directory_or_a_binary_file_is_a_clear_error(tmp_path: Path):
    (tmp_path / "p.yaml").write_text(MINIMAL)
    result = dynamo("serve", str(tmp_path), "--backend", "mocker", "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path}: is a directory, not a profile file; give a YAML file (it holds p.yaml)" in result.stderr
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe")
    result = dynamo("serve", str(binary), "--backend", "mocker", "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{binary}: not a UTF-8 text file (byte 0xff at offset 0)" in result.stderr


def test_validate_checks_every_file_and_reports_every_problem(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: -1}\n")
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    result = dynamo("profile", "validate", str(bad), str(tmp_path / "missing.yaml"), str(good))
    assert result.returncode == 2
    assert f"{bad}:4:17: workers.w.replicas" in result.stderr
    assert f"{tmp_path / 'missing.yaml'}: no such file" in result.stderr
    assert f"{good}: ok (p: backend vllm, 1 worker group, 1 worker)" in result.stdout
    assert "Traceback" not in result.stderr


def test_schema_into_a_missing_directory_is_a_clear_error(tmp_path: Path):
    target = tmp_path / "nodir" / "schema.json"
    result = dynamo("profile", "schema", "-o", str(target))
    assert result.returncode == 2
    assert f"--output {target}: cannot write: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_set_values_expand_variables_as_the_profile_does():
    env = {"KEY": "sekret", "EMPTY": ""}
    loaded = parse_profile(MINIMAL, overrides=["frontend.api_key=${KEY}", "model.name=m-${EMPTY:-x}-$$1"], env=env)
    assert loaded.profile.frontend.api_key == "sekret" and loaded.profile.model.name == "m-x-$1"
    with pytest.raises(ProfileError) as info:
        parse_profile(MINIMAL, overrides=["frontend.api_key=${MISSING}"], env=env)
    assert str(info.value) == ("--set frontend.api_key: ${MISSING} is not set; export MISSING=..., write "
                               "${MISSING:-default}, or $${MISSING} for a literal ${MISSING}")


def test_errors_read_in_yaml_terms_not_python_ones():
    assert problems("name: p\nmodel: {name: m}\nworkers: []\n") == "p.yaml:3:10: workers: expected a mapping (key: value), got a list"
    assert problems("name: p\nmodel: {name: m}\nworkers: {}\n") == "p.yaml:3:10: workers: needs at least one entry"
    assert problems(MINIMAL + "frontend:\n") == "p.yaml:5:1: frontend: expected a mapping (key: value), got nothing (an empty value)"
    assert problems("- a\n").endswith("got a list")


def test_a_profile_that_serves_nothing_is_blamed_on_its_workers_not_on_a_flag():
    text = "name: p\nmodel: {name: m}\nworkers:\n  w: {replicas: 0}\n"
    expected = "p.yaml:4:3: workers: no worker can answer requests: w has replicas: 0"
    assert problems(text) == expected
    assert problems(text, backend="mocker") == expected  # --backend is not a --set, nor the culprit
    assert problems(MINIMAL, overrides=["workers.w.replicas=0"], backend="mocker").endswith("w has replicas: 0")


def test_a_rule_across_keys_broken_by_one_set_blames_that_set():
    assert problems(MINIMAL, overrides=["workers.w.replicas=0"]) == \
        "--set workers.w.replicas: workers: no worker can answer requests: w has replicas: 0"


def test_node_placement_errors_point_at_nodes():
    text = ("name: p\nmodel: {name: m}\nworkers:\n  w: {}\n  v: {}\n"
            "nodes:\n  a: {address: 10.0.0.1, run: [nats, frontend, w]}\n")
    assert problems(text) == "p.yaml:7:3: nodes: nodes do not place: v"
    assert "node 'a' runs unknown component 'frontnd'; did you mean 'frontend'?" in problems(
        text.replace("frontend, w", "frontnd, w, v"))


def test_set_errors_blame_the_flag_once():
    assert problems(MINIMAL, overrides=["frontend.port=abc"]).startswith(
        "--set frontend.port: Input should be a valid integer")
    assert problems(MINIMAL, overrides=["frontnd.port=1"]) == "--set frontnd.port: frontnd: unknown key; did you mean 'frontend'?"
