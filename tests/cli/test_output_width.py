"""Output off a terminal (pipes, CI): nothing a user reads or copies is cut with an ellipsis."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import dynamo


@pytest.fixture
def plain_env(monkeypatch) -> dict:
    """No width hints: what a pipe in a fresh shell or a CI job gets."""
    for name in ("COLUMNS", "TERMINAL_WIDTH", "FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS"):
        monkeypatch.delenv(name, raising=False)
    return dict(os.environ)


def _commands() -> list[list[str]]:
    from typer.main import get_command

    from dynamo.cli.app import app

    out: list[list[str]] = []

    def walk(command, path: list[str]) -> None:
        out.append(path)
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, path + [name])

    walk(get_command(app), [])
    return out


def test_every_help_fits_80_columns_without_cutting_option_names(plain_env):
    commands = _commands()
    assert ["bench"] in commands and ["bench", "compare"] in commands and ["profile", "list"] in commands
    for path in commands:
        proc = dynamo(*path, "--help", env={"TERMINAL_WIDTH": "80"})
        assert proc.returncode == 0, proc.stderr
        cut = [line for line in proc.stdout.splitlines() if "…" in line]
        assert not cut, f"dynamo {' '.join(path)} --help cuts:\n" + "\n".join(cut)
    bench_help = dynamo("bench", "--help", env={"TERMINAL_WIDTH": "80"}).stdout
    for option in ("--prompts-per-group", "--shared-prefix-len", "--trace-block-size"):
        assert re.search(rf"│ {option}\s", bench_help), option


def test_profile_list_shows_whole_sentences(plain_env):
    proc = dynamo("profile", "list")
    assert proc.returncode == 0
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert lines["agg_router"] == ("Aggregated serving with KV-aware routing: two vLLM workers publish their KV "
                                   "cache events and the router sends each request where most of its prompt is "
                                   "already cached.")
    assert all(text.endswith(".") for text in lines.values()), lines


def test_consoles_are_wide_off_a_terminal_unless_columns_says_otherwise(plain_env):
    code = "from dynamo.cli.app import make_console; print(make_console().width, make_console(stderr=True).width)"
    wide = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plain_env, timeout=60)
    assert wide.stdout.split() == ["200", "200"], wide.stderr
    narrow = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**plain_env, "COLUMNS": "100"})
    assert narrow.stdout.split() == ["100", "100"], narrow.stderr


def test_ps_all_in_an_80_column_terminal_shows_whole_run_ids(tmp_path, plain_env):
    ids = [f"a-rather-long-profile-name-20261202-14580{i}-abc{i}" for i in range(2)]
    for run_id in ids:
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "state.json").write_text(
            '{"run_id": "%s", "profile": "p", "status": "stopped", "endpoint": "http://127.0.0.1:18000"}' % run_id)
    shown = dynamo("ps", "--all", env={**plain_env, "DYNAMO_HOME": str(tmp_path), "COLUMNS": "80"}).stdout
    assert all(run_id in shown for run_id in ids) and "…" not in shown, shown
    assert max(len(line) for line in shown.splitlines()) <= 80, shown


def test_backend_help_lists_every_backend():
    from dynamo.cli.helptext import BACKEND_NAMES
    from dynamo.core.profile import BACKENDS

    assert BACKEND_NAMES.split(", ") == list(BACKENDS)
    assert BACKEND_NAMES in dynamo("serve", "--help", env={"COLUMNS": "200"}).stdout


def test_profile_list_wraps_descriptions_in_an_80_column_terminal(plain_env):
    shown = dynamo("profile", "list", env={**plain_env, "COLUMNS": "80"}).stdout
    assert max(len(line) for line in shown.splitlines()) <= 80, shown
    assert "where most of its prompt is" in " ".join(shown.split())  # wrapped, not cut


def test_help_names_values_not_python_types(plain_env):
    """Every option shows what to type (N, SECONDS, PATH...) and flags show nothing, never typer's
    <bool>, <str> or <int range>; arguments are named in capitals. (typer itself still prints the
    type of an argument and of --help, and braces around required arguments in the usage line.)"""
    for path in _commands():
        proc = dynamo(*path, "--help", env={"TERMINAL_WIDTH": "200"})
        assert proc.returncode == 0, proc.stderr
        options = re.sub(r"╭─ Arguments.*?╰", "", proc.stdout, flags=re.S)
        options = "\n".join(line for line in options.splitlines() if not re.match(r"│\s+--help\s", line))
        typed = re.findall(r"<(?:bool|str|int|float|int range|float range|path|file|dir)>", options)
        assert not typed, f"dynamo {' '.join(path)} --help shows {typed}"
        usage = next(line for line in proc.stdout.splitlines() if "Usage:" in line)
        assert not re.search(r"[{\[][a-z_]+[}\]]", usage), usage
    serve_help = dynamo("serve", "--help", env={"TERMINAL_WIDTH": "200"}).stdout
    assert "serve [OPTIONS] {PROFILE}" in serve_help
    assert re.search(r"│ --dry-run\s+Print the plan", serve_help)
    assert re.search(r"│ --replica\s+N\s+\[x>=0\]", serve_help)
    assert re.search(r"│ --run-dir\s+DIR\s", serve_help)
