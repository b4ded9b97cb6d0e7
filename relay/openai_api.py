"""OpenAI-compatible endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(streaming as server-sent events), answered by generating through the swarm."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Callable, Mapping, Optional

from aiohttp import web

from relay.generation import ModelService, Result, find_model
from relay.http import HTTPError, json_reply, read_body
from relay.schemas import ChatCompletionRequest, CompletionRequest
from telemetry import tracing

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class OpenAIRoutes:
    def __init__(self, services: Mapping[str, ModelService], check_key: Callable[[web.Request], None]):
        self.services = services
        self.check_key = check_key

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.middlewares.insert(0, _traced)  # outermost: the span sees the status of error replies too

    async def models(self, request: web.Request) -> web.Response:
        self.check_key(request)
        data = []
        for name, service in self.services.items():
            for model in [name] + [f"{name}:{adapter}" for adapter in await service.adapters()]:
                data.append({"id": model, "object": "model", "created": service.created, "owned_by": "swarm"})
        return json_reply({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.check_key(request)
        body = await read_body(request, CompletionRequest)
        service, adapter = await find_model(self.services, body.model)
        gen = await service.make_request(
            body.prompt, body.max_tokens, body.temperature, body.top_p, body.stop_list(), adapter=adapter
        )
        ident = f"cmpl-{uuid.uuid4().hex}"
        model = f"{service.name}:{adapter}" if adapter else service.name

        def chunk(text: str, finish: Optional[str]) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            return await self._stream(request, service, gen, chunk)
        result = await service.generate(gen, cancelled=_client_gone(request))
        reply = chunk(result.text, result.finish_reason)
        reply["usage"] = _usage(result)
        return json_reply(reply)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.check_key(request)
        body = await read_body(request, ChatCompletionRequest)
        service, adapter = await find_model(self.services, body.model)
        gen = await service.chat_request(
            body.messages,
            body.max_completion_tokens or body.max_tokens,
            body.temperature,
            body.top_p,
            body.stop_list(),
            adapter=adapter,
        )
        model = f"{service.name}:{adapter}" if adapter else service.name
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        first = True

        def chunk(text: str, finish: Optional[str]) -> dict[str, Any]:
            nonlocal first
            delta: dict[str, Any] = {"content": text} if text or finish is None else {}
            if first:
                delta["role"] = "assistant"
                first = False
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            return await self._stream(request, service, gen, chunk)
        result = await service.generate(gen, cancelled=_client_gone(request))
        return json_reply(
            {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "logprobs": None,
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": _usage(result),
            }
        )

    async def _stream(self, request: web.Request, service: ModelService, gen, chunk) -> web.StreamResponse:
        """Server-sent events: one chunk per text delta, a last one with the finish reason, then [DONE].

        Errors before the first byte are ordinary JSON errors; later ones arrive as an `error` event.
        """
        queue: asyncio.Queue[Optional[str]] = asyncio.Queue()
        gone = False
        task = asyncio.create_task(service.generate(gen, on_delta=queue.put_nowait, cancelled=lambda: gone))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        response: Optional[web.StreamResponse] = None
        try:
            while True:
                delta = await queue.get()
                if delta is None:
                    break
                if response is None:
                    response = await _open_stream(request)
                await _send(response, chunk(delta, None))
            result: Result = await task  # raises the generation's error, if any
            if response is None:
                response = await _open_stream(request)
            last = chunk("", result.finish_reason)
            last["usage"] = _usage(result)
            await _send(response, last)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except ConnectionResetError:
            gone = True
            logger.info("%s: the client went away; generation stopped", request.path)
            return response if response is not None else web.Response(status=499)  # nobody reads it
        except asyncio.CancelledError:
            gone = True
            raise
        except HTTPError as e:
            if response is None:
                raise
            await _send(response, {"error": {"message": e.message, "type": "server_error", "code": e.status}})
            await response.write_eof()
            return response
        finally:
            if not task.done():  # the caller went away or writing failed: end the generation too
                gone = True
                await asyncio.gather(task, return_exceptions=True)


@web.middleware
async def _traced(request: web.Request, handler):
    """With tracing on, a generation request is a server span, the child of the caller's `traceparent`
    header when it sends one (W3C trace context); the generation's own spans are its children."""
    if not tracing.enabled() or request.method != "POST" or request.path not in GENERATION_PATHS:
        return await handler(request)
    with tracing.span(
        f"POST {request.path}",
        kind="server",
        parent=request.headers.get("traceparent", "").strip(),
        attributes={"http.request.method": "POST", "http.route": request.path},
    ) as current:
        response = await handler(request)
        tracing.set_attributes(current, **{"http.response.status_code": response.status})
        return response


def _client_gone(request: web.Request) -> Callable[[], bool]:
    """Whether the HTTP client has closed its connection: a generation nobody will read stops at
    its next token (aiohttp does not cancel a handler when its client leaves)."""

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data)}\n\n".encode())


def _usage(result: Result) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts what prefix caches served."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }
