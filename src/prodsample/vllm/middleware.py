"""prodsample's part of a vLLM API server, as ASGI middleware (`vllm serve ... --middleware <class>`, once per
class): checks of tagged requests against the served engine, and the records, without vLLM's dev mode.

- `TagCheck`: a completion request whose prodsample tag names a value outside the engine (a release token
  past the vocabulary) gets HTTP 400 naming the field, before it reaches the engine; so does a tagged request
  without the `X-data-parallel-rank` header on a data-parallel server (vLLM's balancer would route the two
  requests of a pair on their own: both must name one rank, `prodsample.vllm.client` does). The tag's own format
  is checked by the logits processor's `validate_params` (also HTTP 400); the engine's scheduler and
  processor refuse such a tag again for engines fed directly.
- `RecordsEndpoint`: `POST /v1/prodsample/records` with `{"rollouts": [names]}` takes the records of those
  rollouts from the workers of every data-parallel engine (vLLM's own `collective_rpc` returns engine 0's
  results only, and would delete the other ranks' records unread) (`prodsample.vllm.processor.RecordsExtension`) and returns them as
  JSON with NaN literals (`{name: RolloutRecord as a list}`); `GET /v1/prodsample/engine_info` returns the
  workers' `prodsample_engine_info` (one per worker of every engine) and the server's data-parallel size. Both under the server's API key, as `/v1/completions`: vLLM adds
  middleware given with `--middleware` outside its own authentication, so these check the key themselves.
  A rollout's records are read, and deleted, only by whoever knows its name (128 random bits per call,
  `prodsample.vllm.guided_call.GuidedCall.plan`).

Both read the engine client vLLM's server keeps in `app.state.engine_client` (vllm/entrypoints/launchers/
api_server/app_state.py) and the server's arguments in `app.state.args`.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vllm import envs
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from .pairing import MAX_ROLLOUT_NAME, GuidanceTag
from .record_reader import every_worker, take_records_from
from .routes import DP_RANK_HEADER, ENGINE_INFO_PATH, RECORDS_PATH

__all__ = ["TagCheck", "RecordsEndpoint"]

MAX_BODY_BYTES = 64 * 2**20  # a tagged completion request holds token ids; larger bodies pass unchecked to vLLM
MAX_ROLLOUTS_PER_READ = 65_536


async def _respond(send: Send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(text.encode())).encode())]})
    await send({"type": "http.response.body", "body": text.encode()})


def _error(status: int, message: str, param: str | None = None) -> str:
    kind = "BadRequestError" if status == 400 else "Unauthorized" if status == 401 else "Error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})


def _path(scope: Scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", ""))


def _authorized(scope: Scope) -> bool:
    """Whether the request carries one of the server's API keys (True when it has none), as vLLM checks them."""
    args = scope["app"].state.args
    tokens = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]
    if not tokens:
        return True
    return AuthenticationMiddleware(None, tokens).verify_token(Headers(scope=scope))


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    """The request body, and the messages read to get it (replayed to the app)."""
    messages, chunks, size = [], [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return b"".join(chunks), messages
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False) or size > MAX_BODY_BYTES:
            return b"".join(chunks), messages


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first hands out `messages` again (then the client's own, so disconnects still reach vLLM)."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


def _tag_of(body: bytes) -> GuidanceTag | None:
    """The prodsample tag of a completion request body; None if it has none, or if the body or the tag is
    malformed (vLLM answers those with HTTP 400, the tag's format through the processor's `validate_params`)."""
    try:
        request = json.loads(body)
        extra = request.get("vllm_xargs") if isinstance(request, dict) else None
        return GuidanceTag.from_extra_args(extra) if isinstance(extra, dict) else None
    except (ValueError, UnicodeDecodeError):
        return None


class TagCheck:
    """Refuses, with HTTP 400 naming the field, a tagged completion request that does not fit the engine."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not _path(scope).endswith("/completions"):
            return await self.app(scope, receive, send)
        if not _authorized(scope):
            return await self.app(scope, receive, send)  # vLLM's authentication answers it
        body, messages = await _read_body(receive)
        tag = _tag_of(body)
        engine = scope["app"].state.engine_client
        try:
            if tag is not None:
                tag.check_fits(engine.model_config.get_vocab_size())
        except ValueError as error:
            return await _respond(send, 400, _error(400, str(error), "vllm_xargs.prodsample.release_token"))
        ranks = engine.vllm_config.parallel_config.data_parallel_size
        if tag is not None and ranks > 1 and DP_RANK_HEADER not in Headers(scope=scope):
            message = (f"a prodsample-tagged request to a data-parallel server ({ranks} ranks) needs the "
                       f"{DP_RANK_HEADER} header, the same for both requests of a pair")
            return await _respond(send, 400, _error(400, message, DP_RANK_HEADER))
        await self.app(scope, _replaying(messages, receive), send)


class RecordsEndpoint:
    """`POST /v1/prodsample/records` and `GET /v1/prodsample/engine_info` (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _path(scope) if scope["type"] == "http" else None
        if path not in (RECORDS_PATH, ENGINE_INFO_PATH):
            return await self.app(scope, receive, send)
        if not _authorized(scope):
            return await _respond(send, 401, _error(401, "Unauthorized"))
        engine = scope["app"].state.engine_client
        if path == ENGINE_INFO_PATH:
            if scope.get("method") != "GET":
                return await _respond(send, 405, _error(405, f"{ENGINE_INFO_PATH} takes GET"))
            results = await every_worker(engine, "prodsample_engine_info")
            # the engines' workers see data_parallel_size 1 each: the API server's config has the count
            ranks = engine.vllm_config.parallel_config.data_parallel_size
            return await _respond(send, 200, json.dumps({"results": results, "data_parallel_size": ranks}))
        if scope.get("method") != "POST":
            return await _respond(send, 405, _error(405, f"{RECORDS_PATH} takes POST"))
        body, _ = await _read_body(receive)
        try:
            names = _rollout_names(body)
        except ValueError as error:
            return await _respond(send, 400, _error(400, str(error), "rollouts"))
        # NaN literals: a desynced record's guide log-probs
        await _respond(send, 200, json.dumps(await take_records_from(engine, names)))


def _rollout_names(body: bytes) -> list[str]:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body must be JSON: {\"rollouts\": [rollout names]}") from None
    names = request.get("rollouts") if isinstance(request, dict) else None
    if (not isinstance(names, list) or len(names) > MAX_ROLLOUTS_PER_READ
            or not all(isinstance(name, str) and 0 < len(name) <= MAX_ROLLOUT_NAME for name in names)):
        raise ValueError(f"'rollouts' must be a list of at most {MAX_ROLLOUTS_PER_READ} rollout names (strings of 1 to "
                         f"{MAX_ROLLOUT_NAME} characters)")
    return names
