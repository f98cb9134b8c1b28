"""vLLM integration: guided rollouts on stock vLLM, in process (`GuidedLLM`) or from a server (`GuidedClient`).

One module per job, each importing only what it needs:

    processor    the logits processor (the `vllm.logits_processors` entry point) and `RecordsExtension`
    llm          `GuidedLLM`, `build_engine`: rollouts on an engine in this process
    pairing      finding a pair's two rows in a batch and drawing its token (framework-free)
    pacing       admitting pairs between engine steps and reading the outcomes back (framework-free)
    guided_call  one call's tagged requests, planned from the prompts and settled into a `GuidedRollout`
    scheduler    `PairedScheduler`, which admits, preempts and finishes a pair's two requests together
    sync         the checked in-place weight sync into an engine
    client       `GuidedClient` / `AsyncGuidedClient`: the same rollouts from a vLLM server over HTTP
    middleware   the server's side of the client: tag checks against the engine, and the records endpoint
    routes       the paths that middleware serves (vLLM-free, for the client)
    record_reader  reading finished rollouts' records, many per engine call (client and verl's server)

The names below resolve on first use, so that the framework-free modules and the client (which needs httpx,
not vLLM) import without vLLM installed.
"""

from __future__ import annotations

import importlib

# public name -> the module of this package that defines it
_EXPORTS = {
    "GuidedLLM": "llm",
    "build_engine": "llm",
    "engine_limits": "llm",
    "DEFAULT_ENGINE_KWARGS": "llm",
    "GenerationStats": "pacing",
    "ProductLogitsProcessor": "processor",
    "ProductLogitsProcessorV1": "processor",
    "ProductLogitsProcessorV2": "processor",
    "RecordsExtension": "processor",
    "PairedScheduler": "scheduler",
    "EngineSettings": "scheduler",
    "GuidanceTag": "pairing",
    "DesyncCause": "pairing",
    "RolloutRecord": "pairing",
    "GuidedCall": "guided_call",
    "EngineWeightSync": "sync",
    "GuidedClient": "client",
    "AsyncGuidedClient": "client",
    "ServerBackend": "client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
