"""Text generation through the swarm for the relay's OpenAI-compatible API and its jobs.

Each served model is a client of the swarm (`AutoDistributedModelForCausalLM`) plus its tokenizer.
Generation is blocking torch work, so it runs on a bounded thread pool; text reaches the event loop
as deltas through a queue. Stop strings end generation early (the session is closed at once), and
every session's outcome feeds the servers' reliability scores.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Optional, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM, BadRequestError, SwarmError, load_tokenizer
from relay.http import HTTPError
from relay.schemas import ChatMessage

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
LIMIT_MAX_AGE = 30.0  # seconds the swarm's session-length limit is trusted before it is read again


class _Stopped(Exception):
    """Raised inside generation to end it: a stop string appeared or the caller went away."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: Sequence[str] = ()
    region: str = ""  # the servers' region its chain prefers ("": the relay's client's own)
    adapter: str = ""  # the LoRA adapter it runs with ("": none), asked for as model "base:adapter"


@dataclass
class Result:
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the servers started from their prefix caches
    completion_tokens: int = 0
    finish_reason: str = "length"
    chain: list[str] = field(default_factory=list)


class _DeltaStreamer(BaseStreamer):
    """Turns generated token ids into text deltas, holding back what might be the start of a stop string."""

    def __init__(self, tokenizer, request: Request, emit: Callable[[str], None], cancelled: Callable[[], bool]):
        self.tokenizer = tokenizer
        self.request = request
        self.emit = emit
        self.cancelled = cancelled
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        if self.cancelled():
            raise _Stopped("cancelled")
        self.ids.extend(int(t) for t in value.reshape(-1))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.request.stop:
            at = text.find(stop)
            if at >= 0:
                self.text = text[:at]
                self.stopped = True
                self._flush(len(self.text))
                raise _Stopped("stop string")
        self.text = text
        self._flush(self._safe_length(text))

    def _safe_length(self, text: str) -> int:
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = len(text.rstrip("\ufffd"))
        for stop in self.request.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return safe

    def _flush(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent : upto])
            self.sent = upto

    def end(self) -> None:
        if not self.stopped:
            self._flush(len(self.text))


async def find_model(services: Mapping[str, "ModelService"], name: str) -> tuple["ModelService", str]:
    """The served model called `name` and the LoRA adapter it names ("base:adapter", "" for none),
    or a 404 naming what is served."""
    base, _, adapter = name.partition(":")
    service = services.get(base)
    if service is None:
        known = ", ".join(sorted(services)) or "none"
        raise HTTPError(404, f"the model {base!r} is not served by this relay (served: {known})")
    if adapter and adapter not in await service.adapters():
        served = ", ".join(await service.adapters()) or "none"
        raise HTTPError(404, f"no server of {base} serves the adapter {adapter!r} now (served: {served})")
    return service, adapter


class ModelService:
    """One model the relay serves: its swarm client, tokenizer and chat formatting."""

    def __init__(
        self,
        path: str | Path,
        initial_peers: Sequence[str],
        executor: ThreadPoolExecutor,
        request_timeout: float,
        scores: Callable[[], Awaitable[Mapping[str, float]]],
        min_reliability: float,
        outcome: Callable[[str, bool], None],
        verify: float,
        prompt_lookup: int = 0,
    ):
        self.path = Path(path)
        self.prompt_lookup = prompt_lookup  # prompt_lookup_num_tokens of every generation (0: none)
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            self.path,
            initial_peers,
            request_timeout=request_timeout,
            reliability=scores,
            min_reliability=min_reliability,
            verify=verify,
        )
        self.model.on_server_failure(lambda peer, _reason: outcome(peer, False))
        self.outcome = outcome
        self.tokenizer = load_tokenizer(self.path)
        self.executor = executor
        self.created = int(time.time())
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._limit: Optional[tuple[float, int]] = None  # (when read, longest session the swarm can hold)
        self._adapters: Optional[tuple[float, list[str]]] = None  # (when read, adapters its servers serve)

    @property
    def name(self) -> str:
        return self.model.model_name

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The tokenizer's chat template, or a plain `role: text` transcript for models without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt=True, tokenize=False
            )
        return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"

    async def chat_request(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: Optional[int],
        temperature: Optional[float],
        top_p: Optional[float],
        stop: Sequence[str] = (),
        region: str = "",
        adapter: str = "",
    ) -> Request:
        return await self.make_request(
            self.chat_prompt(messages), max_tokens, temperature, top_p, stop, region, adapter
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    async def adapters(self) -> list[str]:
        """The LoRA adapters the swarm's servers of this model serve (read again every 30 s at most)."""
        now = time.monotonic()
        if self._adapters is None or now - self._adapters[0] > LIMIT_MAX_AGE:
            try:
                self._adapters = (now, await asyncio.to_thread(self.model.served_adapters))
            except Exception as e:
                logger.warning("could not read %s's servers from the DHT: %s", self.name, e)
                return self._adapters[1] if self._adapters is not None else []
        return self._adapters[1]

    async def context_limit(self) -> int:
        """The longest session possible: the model's context, capped by what the servers accept (for
        every block, its most generous usable server's `max_length`)."""
        now = time.monotonic()
        if self._limit is None or now - self._limit[0] > LIMIT_MAX_AGE:
            try:
                swarm = await asyncio.to_thread(self.model.longest_session)
            except Exception as e:  # the generation itself will say what is wrong with the swarm
                logger.warning("could not read %s's servers from the DHT: %s", self.name, e)
                return self.context_length
            self._limit = (now, min(self.context_length, swarm) if swarm else self.context_length)
        return self._limit[1]

    async def make_request(
        self,
        prompt: str,
        max_tokens: Optional[int],
        temperature: Optional[float],
        top_p: Optional[float],
        stop: Sequence[str],
        region: str = "",
        adapter: str = "",
    ) -> Request:
        """A request checked against the swarm's context (`region`: the servers' region its chain prefers;
        `adapter`: the LoRA adapter it runs with)."""
        ids = self.encode(prompt)
        if not ids:
            raise HTTPError(400, "the prompt is empty after tokenization")
        limit = await self.context_limit()
        room = limit - len(ids)
        if room < 1:
            raise HTTPError(
                400, f"the prompt has {len(ids)} tokens; this model's context in the swarm is {limit} tokens"
            )
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
        elif max_tokens > room:
            raise HTTPError(
                400,
                f"this model's maximum context length in the swarm is {limit} tokens: the prompt "
                f"has {len(ids)}, so max_tokens may be at most {room} (got {max_tokens})",
            )
        return Request(
            ids,
            max_tokens,
            1.0 if temperature is None else temperature,
            1.0 if top_p is None else top_p,
            tuple(stop),
            region,
            adapter,
        )

    async def generate(
        self,
        request: Request,
        on_delta: Optional[Callable[[str], None]] = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Result:
        loop = asyncio.get_running_loop()

        def emit(delta: str) -> None:
            if on_delta is not None:
                loop.call_soon_threadsafe(on_delta, delta)

        try:
            # in a copy of this task's context: the generation's spans are children of the request's
            run = functools.partial(contextvars.copy_context().run, self._generate, request, emit, cancelled)
            return await loop.run_in_executor(self.executor, run)
        except BadRequestError as e:  # the servers judged the request itself wrong: the caller's to fix
            raise HTTPError(400, f"the swarm refused this request: {e}") from None
        except SwarmError as e:
            raise HTTPError(503, f"the swarm could not run {self.name}: {e}") from None

    def _generate(self, request: Request, emit: Callable[[str], None], cancelled: Callable[[], bool]) -> Result:
        streamer = _DeltaStreamer(self.tokenizer, request, emit, cancelled)
        ids = torch.tensor([request.prompt_ids], dtype=torch.long)
        sampling = (
            dict(do_sample=False)
            if request.temperature == 0
            else dict(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
        )
        if self.prompt_lookup > 0:
            sampling["prompt_lookup_num_tokens"] = self.prompt_lookup
        result = Result(prompt_tokens=len(request.prompt_ids))
        session_id = uuid.uuid4().hex[:8]
        with self.model.inference_session(
            max_length=len(request.prompt_ids) + request.max_tokens,
            region=request.region or None,
            active_adapter=request.adapter or None,
        ) as session:
            try:
                output = self.model.generate(
                    ids, session=session, streamer=streamer, max_new_tokens=request.max_tokens, **sampling
                )
                generated = output[0, len(request.prompt_ids) :].tolist()
                eos = self.model.generation_config.eos_token_id
                eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
                result.finish_reason = "stop" if generated and generated[-1] in eos_ids else "length"
            except _Stopped:
                result.finish_reason = "stop"
            result.chain = [peer for peer, _, _ in session.chain]
            result.cached_tokens = session.cached_tokens
        for peer in result.chain:
            self.outcome(peer, True)
        result.text = streamer.text
        result.completion_tokens = len(streamer.ids)
        logger.info(
            "generation %s on %s: %d prompt + %d new tokens (%s)",
            session_id,
            self.name,
            result.prompt_tokens,
            result.completion_tokens,
            result.finish_reason,
        )
        return result

    def shutdown(self) -> None:
        self.model.shutdown()
