"""Every shipped profile serves on a CPU with ``--backend mocker``: ready, and answers the OpenAI client."""

from __future__ import annotations

import pytest

from dynamo.core.profile import SHIPPED_PROFILES_DIR

PROFILES = sorted(p.stem for p in SHIPPED_PROFILES_DIR.glob("*.yaml"))
FREE_PORTS = ("--set", "frontend.port=0", "--set", "nats.port=0", "--set", "ports.base=0")


def test_the_shipped_profiles_cover_every_engine_and_topology():
    expected = {"agg", "agg_router", "disagg", "disagg_router", "multinode",
                "agg_sglang", "disagg_sglang", "agg_trtllm", "disagg_trtllm"}
    assert expected <= set(PROFILES)


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_shipped_profile_serves_with_the_mocker(profile, serve):
    from openai import OpenAI

    run = serve(profile, "--backend", "mocker", *FREE_PORTS, env={"DYNAMO_MODEL_PATH": "", "DYNAMO_PORT": ""})
    state = run.wait_ready(timeout=60)
    model = state["model"]
    client = OpenAI(base_url=state["endpoint"] + "/v1", api_key="none", timeout=30, max_retries=0)
    reply = client.chat.completions.create(model=model, max_tokens=4,
                                           messages=[{"role": "user", "content": "hello from " + profile}])
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 4
