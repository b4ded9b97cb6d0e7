"""The decoding loop: transformers' generation arguments and logits processors, steps through the swarm.

Greedy decoding picks the same tokens as `transformers`' `generate()` on the same checkpoint; sampling
uses the same processors (temperature, top-k, top-p, min-p, repetition penalty) in the same order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import warnings
from typing import Any, Optional

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from client.audit import Rollback
from client.errors import BadRequestError, ServerProvenWrongError, WrongResultWarning
from client.session import InferenceSession
from client.shared_head import SharedHead
from client.speculation import (
    DEFAULT_ASSISTANT_TOKENS,
    DEFAULT_NGRAM,
    AssistantDrafter,
    DraftSize,
    PromptLookup,
    verify_greedy,
    verify_sampled,
)

logger = logging.getLogger(__name__)


# What generate() implements; any other generation argument the caller sets is refused, never dropped.
SUPPORTED = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "num_beams",
        "use_cache",
        "prompt_lookup_num_tokens",
        "max_matching_ngram_size",
        "num_assistant_tokens",
        "transformers_version",
    }
)


def prepare_config(
    base: GenerationConfig, generation_config: Optional[GenerationConfig], kwargs: dict[str, Any]
) -> GenerationConfig:
    """The model's generation config, updated by the caller's, then by keyword arguments, like transformers.
    An argument generate() does not implement, set by the caller, is an error."""
    given = set(kwargs) | (set(generation_config.to_diff_dict()) if generation_config is not None else set())
    if given - SUPPORTED:
        raise TypeError(
            f"generate() does not support {', '.join(sorted(given - SUPPORTED))}; it supports "
            f"{', '.join(sorted(SUPPORTED - {'transformers_version'}))} and assistant_model"
        )
    config = copy.deepcopy(generation_config if generation_config is not None else base)
    unused = config.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unsupported argument(s): {', '.join(sorted(unused))}")
    config.update(**config._get_default_generation_params(), defaults_only=True)
    if (config.num_beams or 1) > 1:
        raise NotImplementedError("beam search is not supported; use greedy decoding or sampling")
    if config.max_new_tokens is None and config.max_length is None:
        raise ValueError("pass max_new_tokens (or max_length)")
    if config.use_cache is False:
        raise ValueError("use_cache=False is not supported: servers keep every session's KV cache")
    return config


def make_drafter(config: GenerationConfig, assistant_model: Any, vocab_size: int, batch: int, processors):
    """The drafter that speculative decoding was asked for (None: plain decoding) and its DraftSize."""
    lookup = config.prompt_lookup_num_tokens
    if lookup is None and assistant_model is None:
        return None, None
    if lookup is not None and assistant_model is not None:
        raise ValueError("pass prompt_lookup_num_tokens or assistant_model, not both")
    if batch != 1:
        raise ValueError(
            f"speculative decoding (prompt_lookup_num_tokens, assistant_model) needs a batch of 1, got {batch}"
        )
    if assistant_model is not None:
        return AssistantDrafter(assistant_model, vocab_size, processors), DraftSize(
            config.num_assistant_tokens or DEFAULT_ASSISTANT_TOKENS
        )
    if not isinstance(lookup, int) or lookup < 1:
        raise ValueError(f"prompt_lookup_num_tokens must be a positive integer, got {lookup!r}")
    return PromptLookup(config.max_matching_ngram_size or DEFAULT_NGRAM), DraftSize(lookup)


def build_processors(config: GenerationConfig) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p))
    return processors


def _eos_ids(config: GenerationConfig) -> Optional[torch.Tensor]:
    eos = config.eos_token_id
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)


class _StreamerRelay:
    """Hands a streamer's calls to the caller's thread: generations run on the client's event loop,
    and a streamer may be slow or block (a terminal it prints to, a queue it fills), which must never
    hold up the other generations there."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, value: torch.Tensor) -> None:
        self.events.put(("put", value))

    def end(self) -> None:
        self.events.put(("end", None))

    def warn(self, message: str) -> None:
        self.events.put(("warn", message))


class _Stopped(Exception):
    """The caller asked the generation to stop: it was interrupted, or its streamer raised."""


def decode(
    head: SharedHead,
    session: InferenceSession,
    new_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    config: GenerationConfig,
    streamer: Optional[BaseStreamer] = None,
    assistant_model: Any = None,
) -> torch.Tensor:
    """`adecode` on the client's event loop, where every generation of the client runs (one thread
    stepping them all, instead of one thread each); the streamer is called on the caller's thread.
    A caller interrupted while it waits (or whose streamer raises) stops the generation at its next
    token: the step in flight finishes, so the session stays consistent."""
    relay = _StreamerRelay() if streamer is not None else None
    stop = threading.Event()
    done = session.runtime.submit(adecode(head, session, new_ids, attention_mask, config, relay, assistant_model, stop))
    try:
        if streamer is not None:
            _call_streamer(streamer, relay, done, stop)
        return done.result()
    except BaseException:
        stop.set()
        raise


def _call_streamer(
    streamer: BaseStreamer, relay: _StreamerRelay, done: concurrent.futures.Future, stop: threading.Event
) -> None:
    """Calls `streamer` with what the generation relays, until it is over. If the streamer raises,
    the generation is stopped and waited for before the error goes on (the caller may continue the
    session), and the streamer still gets its `end()`."""
    done.add_done_callback(lambda _: relay.events.put(None))
    while (event := relay.events.get()) is not None:
        kind, value = event
        try:
            if kind == "put":
                streamer.put(value)
            elif kind == "end":
                streamer.end()
            else:
                warnings.warn(value, WrongResultWarning, stacklevel=4)
        except BaseException:
            stop.set()
            while (event := relay.events.get()) is not None:  # until the generation is over
                if event[0] == "end":
                    streamer.end()
            raise


async def _roll_back(
    session: InferenceSession,
    rollback: Rollback,
    all_ids: torch.Tensor,
    mask: Optional[torch.Tensor],
    prompt_length: int,
    eos: Optional[torch.Tensor],
    streamer: Optional[_StreamerRelay],
):
    """Drops the tokens that rest on outputs of a server proven wrong and rewinds the session to the
    last position verified for it (never into the caller's own tokens). Returns the kept tokens,
    their mask and which rows are still unfinished."""
    keep = min(max(rollback.position + 1, prompt_length), all_ids.shape[1])
    message = (
        f"server(s) {', '.join(rollback.peers)} returned wrong results; "
        f"{all_ids.shape[1] - keep} generated token(s) are generated again"
    )
    logger.warning(message)
    if streamer is not None:
        streamer.warn(f"{message}: tokens already streamed from position {keep} on were wrong")
    await session.arewind(rollback.position)
    all_ids = all_ids[:, :keep]
    mask = mask[:, :keep] if mask is not None else None
    if eos is None:
        unfinished = torch.ones(all_ids.shape[0], dtype=torch.bool)
    else:
        unfinished = ~torch.isin(all_ids[:, prompt_length:], eos).any(dim=1)
    return all_ids, mask, unfinished


async def _embed(head: SharedHead, ids: torch.Tensor) -> torch.Tensor:
    """The embeddings of `ids`: a decode step's inline, a prompt's on a worker thread (a large copy)."""
    if ids.shape[1] <= 1:
        return head.embed_tokens(ids)
    return await asyncio.to_thread(head.embed_tokens, ids)


async def adecode(
    head: SharedHead,
    session: InferenceSession,
    new_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    config: GenerationConfig,
    streamer: Optional[_StreamerRelay] = None,
    assistant_model: Any = None,
    stop: Optional[threading.Event] = None,
) -> torch.Tensor:
    """Appends `new_ids` to the session, generates, and returns every token of the session (with
    speculation if `config.prompt_lookup_num_tokens` or `assistant_model` asks for it), unless `stop`
    is set: then it raises before its next step.

    The last generated token is kept in `session.token_ids` but not yet sent, so a later call on the
    same session continues exactly where this one stopped.
    """
    if session.token_ids is None:
        all_ids, mask = new_ids, attention_mask
    else:
        if new_ids.shape[0] != session.token_ids.shape[0]:
            raise ValueError(f"session holds a batch of {session.token_ids.shape[0]}, got {new_ids.shape[0]} sequences")
        all_ids = torch.cat([session.token_ids, new_ids], dim=1)
        mask = session.attention_mask
        if mask is not None or attention_mask is not None:
            old = mask if mask is not None else torch.ones_like(session.token_ids)
            new = attention_mask if attention_mask is not None else torch.ones_like(new_ids)
            mask = torch.cat([old, new], dim=1)
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: plain causal attention, nothing extra to send
    if all_ids.shape[1] == session.position:
        raise ValueError("nothing to generate from: pass input_ids")

    prompt_length = all_ids.shape[1]
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_length
    if prompt_length + max_new > session.max_length:
        raise BadRequestError(
            f"{prompt_length} tokens and max_new_tokens={max_new} need a session of {prompt_length + max_new} "
            f"tokens; this one was opened with max_length={session.max_length} (nothing was generated)"
        )
    processors = build_processors(config)
    eos = _eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if eos is not None else None)
    unfinished = torch.ones(all_ids.shape[0], dtype=torch.bool)
    drafter, draft_size = make_drafter(config, assistant_model, head.vocab_size, all_ids.shape[0], processors)
    session.draft_size = draft_size
    me = object()  # this generation, to the shared head
    try:
        if streamer is not None:
            streamer.put(new_ids.cpu())
        if session.position == 0 and not session.spans and all_ids.shape[0] == 1 and mask is None:
            await session.areuse_prefix(all_ids[0])  # servers may hold the prompt's start already (prefix caches)
        while True:
            while all_ids.shape[1] - prompt_length < max_new and unfinished.any():
                if stop is not None and stop.is_set():
                    raise _Stopped()
                rollback = session.take_rollback()
                if rollback is not None:
                    all_ids, mask, unfinished = await _roll_back(
                        session, rollback, all_ids, mask, prompt_length, eos, streamer
                    )
                    continue
                if drafter is not None:
                    before = all_ids.shape[1]
                    try:
                        all_ids, mask, finished = await _speculate(
                            head,
                            me,
                            session,
                            drafter,
                            draft_size,
                            all_ids,
                            mask,
                            config,
                            processors,
                            eos,
                            max_new - (all_ids.shape[1] - prompt_length),
                        )
                    except ServerProvenWrongError:
                        continue
                    unfinished &= ~finished
                    if streamer is not None:
                        for token in all_ids[0, before:]:
                            streamer.put(token.view(1).cpu())
                    continue
                feed = all_ids[:, session.position :]
                try:
                    hidden = await session.astep(await _embed(head, feed), mask)
                except ServerProvenWrongError:
                    continue  # a check finished just before the step, which sent nothing: roll back first
                logits = await head.alogits(hidden[:, -1], me, all_ids.device)  # the head's device may be another
                scores = processors(all_ids, logits)
                if config.do_sample:
                    next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    next_tokens = scores.argmax(dim=-1)
                if eos is not None:
                    next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
                all_ids = torch.cat([all_ids, next_tokens[:, None]], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if eos is not None:
                    unfinished &= ~torch.isin(next_tokens, eos)
            # The result is returned only once spot checks have judged every step it rests on.
            rollback = await session.asettle()
            if rollback is None:
                break
            all_ids, mask, unfinished = await _roll_back(session, rollback, all_ids, mask, prompt_length, eos, streamer)
    finally:
        head.leave(me)  # no product of the shared head waits for this generation's rows any more
        session.token_ids, session.attention_mask = all_ids, mask
        if streamer is not None:
            streamer.end()
    return all_ids


async def _speculate(
    head: SharedHead,
    me: object,
    session: InferenceSession,
    drafter,
    size: DraftSize,
    all_ids: torch.Tensor,
    mask: Optional[torch.Tensor],
    config: GenerationConfig,
    processors: LogitsProcessorList,
    eos: Optional[torch.Tensor],
    remaining: int,
):
    """One trip through the chain with a draft (batch 1): the session's unsent tokens and up to
    `size.size` drafted ones go in one step, the tokens the model agrees with (and its own next one)
    are kept, and the servers forget the rest. Returns the tokens, their mask and whether the row
    finished (an end-of-sequence token). Drafting runs on a worker thread (an assistant model's
    forward passes)."""
    room = min(remaining - 1, session.max_length - all_ids.shape[1])
    draft = None
    if room > 0:
        draft = await asyncio.to_thread(drafter.draft, all_ids, min(size.size, room), config.do_sample)
    drafted = draft.tokens.to(all_ids.device) if draft is not None else all_ids[0, :0]
    count = drafted.shape[0]
    step_ids = torch.cat([all_ids[:, session.position :], drafted[None]], dim=1)
    step_mask = mask
    if mask is not None:
        step_mask = torch.cat([mask, torch.ones(1, count, dtype=mask.dtype, device=mask.device)], dim=1)
    hidden = await session.astep(await _embed(head, step_ids), step_mask)
    logits = await head.alogits(hidden[:, -(count + 1) :], me, all_ids.device)
    context = torch.cat([all_ids, drafted[None]], dim=1)
    length = all_ids.shape[1]
    scores = [processors(context[:, : length + i], logits[:, i])[0] for i in range(count + 1)]
    if config.do_sample:
        probs = draft.probs if draft is not None else None
        kept = verify_sampled(drafted, probs, [torch.softmax(score.float(), dim=-1) for score in scores])
    else:
        kept = verify_greedy(drafted, scores)
    size.update(count, len(kept) - 1)
    finished = False
    if eos is not None:
        ends = set(eos.tolist())
        for index, token in enumerate(kept):
            if token in ends:
                kept, finished = kept[: index + 1], True
                break
    kept = kept[:remaining]
    new = torch.tensor([kept], dtype=all_ids.dtype, device=all_ids.device)
    all_ids = torch.cat([all_ids, new], dim=1)
    if mask is not None:
        mask = torch.cat([mask, torch.ones_like(new, dtype=mask.dtype)], dim=1)
    held = all_ids.shape[1] - 1  # the last token is not sent yet
    if session.position > held:
        await session.arewind(held)
    drafter.accepted(held)
    return all_ids, mask, torch.tensor([finished])
