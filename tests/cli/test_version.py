"""``dynamo --version``."""

from __future__ import annotations

from importlib.metadata import version

from tests.conftest import dynamo


def test_version_prints_the_installed_version():
    for flag in ("--version", "-V"):
        result = dynamo(flag)
        assert result.returncode == 0 and result.stdout == f"dynamo {version('dynamo-launcher')}\n", result.stderr
