"""Engine backends. Each engine is one module with the same small interface (``base.Backend``)."""

from __future__ import annotations

from importlib import import_module

from dynamo.core.errors import PlanError

_MODULES = {
    "mocker": "dynamo.backends.mocker.launch",
    "vllm": "dynamo.backends.vllm",
    "sglang": "dynamo.backends.sglang",
    "trtllm": "dynamo.backends.trtllm",
}


def get_backend(name: str):
    """The Backend for ``name`` (mocker, vllm, ...)."""
    module_name = _MODULES.get(name)
    if module_name is None:
        raise PlanError(
            f"backend {name!r} cannot be launched by this version yet; "
            f"run the profile with --backend mocker, or use one of: {', '.join(_MODULES)}"
        )
    return import_module(module_name).BACKEND
