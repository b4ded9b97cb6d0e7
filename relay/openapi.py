"""The OpenAPI 3.1 document of the relay's API port, served at `/openapi.json`.

Request bodies are the pydantic models the handlers validate with, so the document cannot drift
from what the relay accepts.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from relay.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EvidenceReport,
    HeartbeatRequest,
    JobRequest,
    LoadConfig,
    RefreshRequest,
    RegisterRequest,
    ReportRequest,
)

_BODIES = (
    RegisterRequest,
    HeartbeatRequest,
    LoadConfig,
    RefreshRequest,
    ReportRequest,
    EvidenceReport,
    JobRequest,
    CompletionRequest,
    ChatCompletionRequest,
)
_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ADMIN = [{"adminToken": []}]
_API_KEY = [{"apiKeyHeader": []}, {"apiKeyBearer": []}]
_WORKER = [{"workerToken": []}]


def _json(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


def _op(
    summary: str, ok: int, security=None, body: type | None = None, params=None, errors=(400, 401, 404)
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {str(ok): _json("success")}}
    for status in errors:
        op["responses"][str(status)] = _ERROR
    if security is not None:
        op["security"] = security
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}},
        }
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, kind: str = "integer") -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 0} if kind == "integer" else {"type": "string"}
    return {"name": name, "in": "path", "required": True, "schema": schema}


@lru_cache(maxsize=4)
def openapi_document(version: str, models: tuple[str, ...] = ()) -> dict[str, Any]:
    """The document; `models` (the names the relay serves) become examples of every `model` field."""
    _, defs = models_json_schema([(m, "validation") for m in _BODIES], ref_template="#/components/schemas/{model}")
    schemas = dict(defs.get("$defs", {}))
    for name in ("JobRequest", "CompletionRequest", "ChatCompletionRequest"):
        if models:
            schemas[name]["properties"]["model"]["examples"] = list(models)
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}},
            }
        },
    }
    worker_id = [_path_param("worker_id")]
    paging = [
        {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 1}},
        {"name": "perPage", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}},
    ]
    paths = {
        "/v1/workers": {
            "get": _op("Workers of the pool with their status (GPUStack format)", 200, _ADMIN, params=paging)
        },
        "/api/v1/workers/register": {
            "post": _op("Register a worker; returns its tokens and signing secret", 201, body=RegisterRequest)
        },
        "/api/v1/workers/{worker_id}": {"get": _op("One worker with its reliability", 200, _ADMIN, params=worker_id)},
        "/api/v1/workers/{worker_id}/heartbeat": {
            "post": _op(
                "Heartbeat (signed: X-Timestamp, X-Signature)",
                200,
                _WORKER,
                HeartbeatRequest,
                worker_id,
                (400, 401, 404, 423),
            )
        },
        "/api/v1/workers/{worker_id}/config": {
            "get": _op("A worker's load-control config", 200, _ADMIN, params=worker_id),
            "put": _op("Push a new load-control config", 200, _ADMIN, LoadConfig, worker_id),
        },
        "/api/v1/workers/{worker_id}/refresh": {
            "post": _op("Rotate a worker's tokens (signed)", 200, None, RefreshRequest, worker_id, (400, 401, 404, 423))
        },
        "/api/v1/reliability": {"get": _op("Reliability score per server peer id", 200, _API_KEY, errors=(401,))},
        "/api/v1/reports": {"post": _op("Report a session's outcome with a server", 200, _API_KEY, ReportRequest)},
        "/api/v1/evidence": {
            "post": _op(
                "Evidence that a server returned wrong results; re-checked before it counts",
                201,
                _API_KEY,
                EvidenceReport,
                errors=(400, 401, 403, 404, 422, 503),
            )
        },
        "/api/v1/faults": {
            "get": _op("Wrong results proven against servers, newest first", 200, _ADMIN, errors=(401,))
        },
        "/api/v1/jobs": {"post": _op("Submit an LLM job", 201, _API_KEY, JobRequest)},
        "/api/v1/jobs/{job_id}": {
            "get": _op("A job's status and result", 200, _API_KEY, params=[_path_param("job_id", "string")])
        },
        "/api/v1/queue/stats": {"get": _op("Jobs per status and ready workers", 200, _API_KEY, errors=(401,))},
        "/v1/models": {"get": _op("Models served (OpenAI format)", 200, _API_KEY, errors=(401,))},
        "/v1/completions": {
            "post": _op(
                "Text completion (OpenAI format; stream: true for SSE)",
                200,
                _API_KEY,
                CompletionRequest,
                errors=(400, 401, 404, 503),
            )
        },
        "/v1/chat/completions": {
            "post": _op(
                "Chat completion (OpenAI format; stream: true for SSE)",
                200,
                _API_KEY,
                ChatCompletionRequest,
                errors=(400, 401, 404, 503),
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Swarm relay API",
            "version": version,
            "description": "Workers, jobs and an OpenAI-compatible API over a Swarm of block servers.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "the relay's admin token"},
                "apiKeyBearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "workerToken": {"type": "http", "scheme": "bearer", "description": "a worker's access token"},
            },
        },
    }
