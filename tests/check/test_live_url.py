"""``dynamo check --url``: a URL that cannot be an HTTP endpoint is a usage error (exit 2, as for
``dynamo bench --url``), and a port that answers in another protocol is named as such."""

from __future__ import annotations

import pytest

from tests.check.conftest import run_check


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:99999", "error: --url http://127.0.0.1:99999: the port must be a number from 1 to 65535, "
                               "not 99999"),
    ("http://", "error: --url http://: no host"),
    ("http://127.0.0.1:0/v1", "error: --url http://127.0.0.1:0/v1: the port must be a number from 1 to 65535, not 0"),
    ("ftp://x", "error: --url ftp://x"),
    ("not-a-url", "error: --url not-a-url"),
])
def test_a_url_that_cannot_work_is_a_usage_error(url, message):
    check = run_check("--url", url, "--only", "live")
    assert check.code == 2, check.stdout + check.stderr
    assert check.stderr.startswith(message), check.stderr
    assert "Traceback" not in check.stderr and check.stdout == ""


def test_a_port_that_does_not_speak_http_is_named_so(nats_like_server):
    check = run_check("--url", nats_like_server, "--only", "live", "--json")
    assert check.code == 1, check.stdout + check.stderr
    endpoint = check.one("live", "endpoint")
    assert endpoint["status"] == "error"
    assert endpoint["message"] == (f"{nats_like_server} does not speak HTTP (it answers like a NATS server, "
                                   "not an HTTP server)"), endpoint
    assert "host and port" in endpoint["fix"]
    assert "INFO" not in check.stdout and "Bad status line" not in check.stdout
