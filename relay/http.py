"""What every relay port shares: JSON errors, validated bodies and the middleware that keeps a bad
request from ever becoming a 500.

Errors are OpenAI-shaped (`{"error": {"message", "type", "code"}}`) on every port, so one client-side
parser understands them all and the `openai` package raises its typed exceptions.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 10 * 1024 * 1024
Body = TypeVar("Body", bound=BaseModel)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    410: "gone",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    423: "locked_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class HTTPError(Exception):
    """Raised by a handler; the middleware turns it into a JSON error reply with this status."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(status: int, message: str, headers: Optional[dict[str, str]] = None) -> web.Response:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "code": status}}
    return web.json_response(body, status=status, headers=headers)


def json_reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data),
        status=status,
        headers={"Cache-Control": "no-cache"},
        content_type="application/json",
        charset="utf-8",
    )


def describe_validation(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:10]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise HTTPError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    raw = await request.read()
    if not raw:
        raise HTTPError(400, "request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None


async def read_body(request: web.Request, model: type[Body]) -> Body:
    """The request's JSON body validated against `model` (400 naming every wrong field)."""
    data = await read_json(request)
    if not isinstance(data, dict):
        raise HTTPError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise HTTPError(400, describe_validation(e)) from None


def path_int(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(404, f"no such {name.replace('_', ' ')}: {raw!r}") from None
    if not 0 <= value < 2**63:
        raise HTTPError(404, f"no such {name.replace('_', ' ')}: {raw!r}")
    return value


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except HTTPError as e:
        return error_response(e.status, e.message, e.headers)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return error_response(e.status, e.reason or "error", headers)
    except Exception:
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "internal error; the relay's log has the details")


def make_app() -> web.Application:
    return web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
