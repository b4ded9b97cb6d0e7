"""One generation is one OpenTelemetry trace: client step → server step → push to the next server →
reply, with W3C trace context carried in the RPC headers (and in the relay's HTTP requests).

Off by default, and free when off: nothing of OpenTelemetry is imported until `enable()` is called,
and `span()` then hands out no span at all. Span names and attributes follow the GenAI semantic
conventions where they apply (`gen_ai.*`, as vLLM's request span does); the swarm's own are `swarm.*`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Any, Iterator, Mapping, Optional

logger = logging.getLogger(__name__)

# version-traceid-parentid-flags, lower-case hex (W3C Trace Context, level 1)
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
TRACEPARENT_RE = re.compile(TRACEPARENT_PATTERN)
EXPORT_DELAY_MS = 1000  # spans leave in batches at most this late (and all at exit)

_lock = threading.Lock()
_tracer: Any = None
_provider: Any = None
_propagator: Any = None
_kinds: dict[str, Any] = {}


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP endpoint as OTEL_EXPORTER_OTLP_ENDPOINT means it: a base URL gets `/v1/traces`."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def enable(endpoint: str, service: str, attributes: Optional[Mapping[str, str]] = None) -> None:
    """Exports this process's spans to the OTLP/HTTP receiver at `endpoint` (e.g.
    http://127.0.0.1:4318) as service `service`. The first call wins; later ones change nothing."""
    global _tracer, _provider, _propagator
    with _lock:
        if _tracer is not None:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": service, **(attributes or {})})
        provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=10)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
        _kinds.update(
            internal=SpanKind.INTERNAL,
            client=SpanKind.CLIENT,
            server=SpanKind.SERVER,
            producer=SpanKind.PRODUCER,
            consumer=SpanKind.CONSUMER,
        )
        _propagator = TraceContextTextMapPropagator()
        _provider = provider
        _tracer = provider.get_tracer("swarm")
        logger.info("tracing on: spans go to %s as service %s", traces_url(endpoint), service)


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def span(
    name: str, *, kind: str = "internal", parent: str = "", attributes: Optional[Mapping[str, Any]] = None
) -> Iterator[Any]:
    """A span around the block, current inside it (a child of the current span, or of `parent`, a
    traceparent that came over the wire); yields None when tracing is off. A malformed `parent` is
    ignored (the span starts a trace of its own): it came from a stranger."""
    if _tracer is None:
        yield None
        return
    context = None
    if parent and TRACEPARENT_RE.match(parent):
        context = _propagator.extract({"traceparent": parent})
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    with _tracer.start_as_current_span(name, context=context, kind=_kinds[kind], attributes=clean) as current:
        yield current


def traceparent() -> str:
    """The current span's W3C traceparent, to send on; "" when tracing is off or no span is current."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def set_attributes(current: Any, **attributes: Any) -> None:
    """Sets attributes on a span from `span()` (a no-op when tracing is off)."""
    if current is not None:
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def flush(timeout_s: float = 5.0) -> None:
    """Sends the spans still queued (a process about to exit; the SDK also does so at exit)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))
