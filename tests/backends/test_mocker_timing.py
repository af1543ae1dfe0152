"""Unit tests of the step-time model (no processes)."""

from __future__ import annotations

import json

import pytest

from dynamo.backends.mocker.timing import (
    PerfModel,
    PerfTableError,
    load_perf_model,
    polynomial_decode_ms,
    polynomial_prefill_ms,
    transfer_seconds,
)


def test_polynomial_defaults_match_dynamo():
    assert polynomial_prefill_ms(1000) == pytest.approx(4.209989e-07 * 1e6 + 15.18344 + 16.50142)
    assert polynomial_decode_ms(0.0) == pytest.approx(5.74)
    assert polynomial_decode_ms(0.5) == pytest.approx(-25.74 * 0.25 + 27.005 + 5.74)
    assert polynomial_decode_ms(5.0) == 1.0  # floor of 1 ms


def test_step_combines_prefill_and_decode_and_scales():
    m = PerfModel(2.0)
    assert m.step_seconds(100, 0, 0.0) == pytest.approx(polynomial_prefill_ms(100) / 2000)
    assert m.step_seconds(0, 8, 0.25) == pytest.approx(polynomial_decode_ms(0.25) / 2000)
    assert m.step_seconds(100, 8, 0.25) == pytest.approx(
        (polynomial_prefill_ms(100) + polynomial_decode_ms(0.25)) / 2000
    )
    assert PerfModel(0).step_seconds(8000, 64, 0.9) == 0.0


def test_transfer_time_from_bytes_and_bandwidth():
    # 1000 tokens x 125000 bytes x 8 bits / 1e9 bits/s = 1 s
    assert transfer_seconds(1000, 125_000, 1.0, 1.0) == pytest.approx(1.0)
    assert transfer_seconds(1000, 125_000, 1.0, 4.0) == pytest.approx(0.25)
    assert transfer_seconds(1000, 125_000, 1.0, 0.0) == 0.0


def test_perf_table_interpolates(tmp_path):
    p = tmp_path / "perf.json"
    p.write_text(json.dumps({"prefill": [[0, 10], [100, 20]], "decode": [[0.0, 5], [1.0, 15]]}))
    m = load_perf_model(p, 1.0)
    assert m.prefill_ms(50) == pytest.approx(15)
    assert m.prefill_ms(200) == pytest.approx(30)  # extrapolated
    assert m.decode_ms(0.5) == pytest.approx(10)
    assert m.decode_ms(2.0) == pytest.approx(15)  # clamped
    only = tmp_path / "decode.json"
    only.write_text(json.dumps({"decode": [[0.0, 3]]}))
    m = load_perf_model(only, 1.0)
    assert m.decode_ms(0.7) == 3 and m.prefill_ms(10) == pytest.approx(polynomial_prefill_ms(10))


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", '{"prefill": []}', '{"prefill": [[1]]}', '{"decode": [[0, "x"]]}', '{"other": 1}',
     '{"prefill": [[1, 2], [1, 3]]}'],
)
def test_bad_perf_tables_are_rejected(tmp_path, content):
    p = tmp_path / "perf.json"
    p.write_text(content)
    with pytest.raises(PerfTableError):
        load_perf_model(p, 1.0)
