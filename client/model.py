"""`AutoDistributedModelForCausalLM`: a causal LM whose blocks run in the swarm.

Embeddings, final norm and LM head are loaded from the local checkpoint and run here; the
transformer blocks run on the servers that announce them in the DHT.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutput

from blocks.adapters import NAME_PATTERN as ADAPTER_NAME_PATTERN
from blocks.checkpoint import Checkpoint
from blocks.loading import ModelHead, load_head
from blocks.quantization import QUANT_MODES
from client.errors import BadRequestError, SwarmError
from client.generation import decode, prepare_config
from client.prefix_memory import DEFAULT_PREFIX_MEMORY_MBYTES
from client.remote import RemoteModel
from client.session import InferenceSession
from client.shared_head import SharedHead
from client.timing import TokenClock
from configs.schema import DEFAULT_VERIFY_RATE, valid_otlp_endpoint, valid_region
from discovery.mdns import LanDiscovery, MdnsUnavailable
from telemetry import tracing
from verification.evidence import Evidence

logger = logging.getLogger(__name__)

MDNS_WAIT_SECONDS = 10.0  # how long from_pretrained(mdns=True) looks for the swarm's peers on the LAN


class _Unset:
    """The value of an argument left out (None may mean something)."""


UNSET = _Unset()


class AutoDistributedModelForCausalLM:
    def __init__(
        self, checkpoint: Checkpoint, head: ModelHead, remote: RemoteModel, generation_config: GenerationConfig
    ):
        self.checkpoint = checkpoint
        self.head = SharedHead(head)
        self.remote = remote
        self.generation_config = generation_config
        self.active_adapter: Optional[str] = None  # the LoRA adapter new sessions run with (`set_adapter`)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        initial_peers: Sequence[str] = (),
        *,
        mdns: bool = False,
        model_name: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        request_timeout: float = 30.0,
        max_chunk_tokens: int = 1024,
        max_retries: int = 5,
        step_timeout: Optional[float] = 300.0,
        reliability: Optional[Callable[[], Awaitable[Mapping[str, float]]]] = None,
        min_reliability: float = 0.0,
        ban_seconds: float = 5.0,
        push: bool = True,
        verify: float = DEFAULT_VERIFY_RATE,
        region: Optional[str] = None,
        prefix_cache_mbytes: float = DEFAULT_PREFIX_MEMORY_MBYTES,
        otlp_endpoint: Optional[str] = None,
        quant: str | Sequence[str] = "any",
        active_adapter: Optional[str] = None,
    ) -> "AutoDistributedModelForCausalLM":
        """Loads embeddings, norm and LM head from `path` and joins the swarm through `initial_peers`,
        or, with `mdns=True` and no `initial_peers`, through the peers found on this LAN with libp2p
        mDNS (multicast: off unless asked; a `SwarmError` if none answers within 10 s).

        `model_name` defaults to the name servers derive from the same checkpoint. `request_timeout`
        bounds every wait for a server (a hung server is replaced after it); `max_retries` bounds how
        many server failures one step (a whole prompt, or one new token) may survive, reconnections and
        cache replays included; `step_timeout` is that step's one deadline, all of it included
        (`StepTimeoutError`; None: no deadline). With `reliability` (an async callable
        giving scores per peer id, e.g. `client.reliability.RelayScores`), chains avoid servers scoring
        below `min_reliability` whenever other servers cover their blocks. A server that fails is
        banned for `ban_seconds`, doubling with each further failure (at most 300 s). With `push` (the
        default), each server of a chain sends a step's output straight to the next one
        (client → server 1 → … → server S → client); `push=False` makes every output come back to the
        client, which sends it on (2·S network legs per step instead of S + 1).

        `verify` is the spot-check rate (0 turns checks off): after each span's first step, and after
        a `verify` fraction of later steps, each span's new outputs are recomputed by other servers
        of its blocks (or by this process, from `path`, when they fit in its memory) and compared. A
        server proven wrong is banned for good and `generate()` rolls back and recomputes what it
        touched, so the text it returns does not depend on it.

        `region` is this client's region (one of `configs.schema.REGIONS`; default: the
        `SWARM_REGION` environment variable, else none): among comparable chains, the one of servers
        announcing the same `--region` wins.

        `prefix_cache_mbytes` is the memory this client keeps of finished prompts (what each server
        was sent and answered for them), so that a later `generate()` whose prompt starts the same
        reuses the servers' prefix caches and computes only the rest; servers keep the KV of a
        client's prompts for that client only. 0 turns reuse off (servers are not told prompts).

        `quant` says which servers' quantization this client accepts: "any" (the default, as in Petals:
        whatever the swarm serves, int8 and nf4 servers included), "none" (full-precision servers only:
        greedy output is then token-identical to transformers), or a list of modes ("none", "int8",
        "nf4"). `session.quant_modes` tells which a session actually used.

        `active_adapter` names a LoRA adapter every session runs with unless told otherwise (see
        `set_adapter`): one that servers serve (`swarm.serve --adapters`), or one loaded here with
        `load_adapter`. Output is then the local `peft` model's with that adapter.

        `otlp_endpoint` (an OTLP/HTTP receiver, e.g. "http://127.0.0.1:4318") turns on OpenTelemetry
        tracing in this process: each `generate()` is one trace, with a span per step on this side
        and, on servers that trace too, per server step, push and reply (W3C trace context travels
        with each step). Off by default, and nothing of OpenTelemetry is loaded then.
        """
        checkpoint = Checkpoint(path)
        head = load_head(checkpoint, dtype=dtype, device=device)
        if (checkpoint.path / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(checkpoint.path)
        else:
            generation_config = GenerationConfig.from_model_config(dict(checkpoint.config.raw))
        if mdns and not initial_peers:
            initial_peers = lan_peers()
        remote = RemoteModel(
            checkpoint,
            initial_peers,
            model_name,
            request_timeout=request_timeout,
            max_chunk_tokens=max_chunk_tokens,
            max_retries=max_retries,
            step_timeout=step_timeout,
            reliability=reliability,
            min_reliability=min_reliability,
            ban_seconds=ban_seconds,
            push=push,
            verify=verify,
            region=valid_region(os.environ.get("SWARM_REGION", "") if region is None else region),
            prefix_cache_mbytes=prefix_cache_mbytes,
            otlp_endpoint=valid_otlp_endpoint(otlp_endpoint),
            quant=accepted_quant(quant),
        )
        model = cls(checkpoint, head, remote, generation_config)
        model.set_adapter(active_adapter)
        return model

    def load_adapter(self, path: str | os.PathLike, adapter_name: Optional[str] = None) -> str:
        """Loads a LoRA adapter of this client's own (a folder as `peft` saves it; safetensors only) as
        `adapter_name` (default: the folder's name), and returns the name. A session that runs with it
        sends each server its blocks' share, kept for that session only and freed with it; servers
        serving an adapter of the same name are not used for it. Raises ValueError (an AdapterError)
        naming what does not fit the model."""
        return self.remote.local_adapters.add(path, adapter_name)

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """The LoRA adapter new sessions run with (None: none), as peft's `set_adapter`."""
        if adapter_name is not None and not re.match(ADAPTER_NAME_PATTERN, adapter_name):
            raise ValueError(f"adapter name {adapter_name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        self.active_adapter = adapter_name

    @property
    def config(self):
        return self.checkpoint.config

    @property
    def model_name(self) -> str:
        return self.remote.model_name

    def on_server_failure(self, callback: Callable[[str, str], None]) -> None:
        """Calls `callback(peer_id, reason)` whenever a server fails this client (and is banned)."""
        self.remote.failures.listeners.append(callback)

    def on_wrong_result(self, callback: Callable[[Evidence], None]) -> None:
        """Calls `callback(evidence)` when a spot check proves a server wrong (`client.Evidence`)."""
        self.remote.audit.fault_listeners.append(callback)

    @property
    def convicted(self) -> dict[str, Evidence]:
        """Servers proven wrong so far (peer id → evidence); this process never uses them again."""
        return dict(self.remote.audit.convicted)

    def longest_session(self) -> int:
        """The longest session (prompt + new tokens) the swarm's usable servers accept now; 0 if some
        block has none. Raises SwarmError if the DHT cannot be read."""
        return self.remote.runtime.run(self.remote.router.longest_session(), timeout=self.remote.request_timeout)

    def served_adapters(self) -> list[str]:
        """The LoRA adapters this model's servers serve now, by name (from their DHT records)."""
        return self.remote.runtime.run(self.remote.served_adapters(), timeout=self.remote.request_timeout)

    def inference_session(
        self, max_length: int, region: Optional[str] = None, active_adapter: Optional[str] | _Unset = UNSET
    ) -> InferenceSession:
        """A session whose server-side KV caches live until it is closed (use it as a context manager).
        BadRequestError if `max_length` exceeds the model's context (`max_position_embeddings`). With
        `region`, its chains prefer servers of that region instead of the client's own; with
        `active_adapter`, it runs with that LoRA adapter (default: the model's `active_adapter`)."""
        context = self.config.max_position_embeddings
        if max_length > context:
            raise BadRequestError(
                f"a session of {max_length} tokens exceeds the model's context of {context} tokens "
                f"(max_position_embeddings in config.json): shorten the prompt or ask for fewer new tokens"
            )
        adapter = self.active_adapter if isinstance(active_adapter, _Unset) else active_adapter
        return InferenceSession(
            self.remote,
            max_length,
            None if region is None else valid_region(region),
            self.remote.local_adapters.session_adapter(adapter),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """Logits of every position, like `transformers` (a stateless pass: nothing stays cached)."""
        _check_ids(input_ids, attention_mask)
        hidden = self.head.embed_tokens(input_ids)
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        adapter = self.remote.local_adapters.session_adapter(self.active_adapter)
        hidden = self.remote.runtime.run(self.remote.aforward(hidden, mask, adapter))
        return CausalLMOutput(logits=self.head.logits(hidden))

    __call__ = forward

    def generate(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        session: Optional[InferenceSession] = None,
        streamer: Optional[BaseStreamer] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generates like `transformers`' `generate()` and returns prompt + new tokens [batch, length].

        Accepts `max_new_tokens`, `max_length`, `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`,
        `repetition_penalty`, `eos_token_id`, `pad_token_id`, and a `streamer`; any other generation
        argument is refused (TypeError). Speculative decoding (batch 1): `prompt_lookup_num_tokens=k`
        drafts up to k tokens from n-grams of the context (`max_matching_ngram_size`, 2), and
        `assistant_model=` a small local transformers model of the same vocabulary drafts them
        (`num_assistant_tokens`, 20); each draft is verified in one trip through the chain and the
        output is what plain decoding gives (greedy: the same tokens; sampling: the same
        distribution). With `session`, the call continues that session: `input_ids` are tokens to
        append (or None) and the result is every token of the session so far. `active_adapter` runs
        this call's session with that LoRA adapter (default: the model's `active_adapter`).
        """
        assistant_model = kwargs.pop("assistant_model", None)
        active_adapter = kwargs.pop("active_adapter", UNSET)
        config = prepare_config(self.generation_config, generation_config, kwargs)
        if input_ids is None:
            if session is None or session.token_ids is None:
                raise ValueError("input_ids is required (unless continuing a session)")
            input_ids = torch.empty(session.token_ids.shape[0], 0, dtype=torch.long)
        _check_ids(input_ids, attention_mask)
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
        with tracing.span(
            f"text_completion {self.model_name}", kind="client", attributes=_request_attributes(self.model_name, config)
        ) as current:
            clock = TokenClock(inner=streamer) if current is not None else streamer
            if session is not None:
                asked = None if isinstance(active_adapter, _Unset) else active_adapter
                if asked is not None and (session.adapter is None or session.adapter.name != asked):
                    raise ValueError(f"this session runs with adapter {session.adapter_name!r}, not {asked!r}")
                output = decode(self.head, session, input_ids, attention_mask, config, clock, assistant_model)
            else:
                length = max(input_ids.shape[1] + max_new, 1)
                with self.inference_session(max_length=length, active_adapter=active_adapter) as new_session:
                    output = decode(self.head, new_session, input_ids, attention_mask, config, clock, assistant_model)
            if current is not None:
                _record_usage(current, clock, input_ids.shape)
            return output

    def shutdown(self) -> None:
        self.remote.shutdown()
        self.head.close()

    def __enter__(self) -> "AutoDistributedModelForCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def accepted_quant(quant: str | Sequence[str]) -> Optional[frozenset[str]]:
    """The quantizations a client accepts (None: any), from `from_pretrained(quant=...)`."""
    if quant == "any":
        return None
    modes = frozenset([quant] if isinstance(quant, str) else quant)
    unknown = sorted(modes - set(QUANT_MODES))
    if unknown or not modes:
        raise ValueError(f"quant must be 'any', or one or more of {', '.join(QUANT_MODES)}; got {quant!r}")
    return modes


def lan_peers(timeout: float = MDNS_WAIT_SECONDS) -> list[str]:
    """Multiaddrs of the swarm's peers found on this LAN with mDNS (a SwarmError if none answers)."""
    try:
        with LanDiscovery() as lan:
            found = lan.wait_for_peers(timeout)
    except MdnsUnavailable as e:
        raise SwarmError(str(e)) from None
    if not found:
        raise SwarmError(f"mDNS: no swarm peer answered on this LAN within {timeout:g} s; pass initial_peers instead")
    return found


def _request_attributes(model_name: str, config: GenerationConfig) -> dict[str, Any]:
    """A generation's span attributes, as the GenAI semantic conventions name them."""
    sampled = bool(config.do_sample)
    return {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "swarm",
        "gen_ai.request.model": model_name,
        "gen_ai.request.max_tokens": config.max_new_tokens,
        "gen_ai.request.temperature": config.temperature if sampled else None,
        "gen_ai.request.top_p": config.top_p if sampled else None,
        "gen_ai.request.top_k": config.top_k if sampled else None,
    }


def _record_usage(current: Any, clock: TokenClock, shape: torch.Size) -> None:
    """Tokens in and out, and vLLM's latency attributes (TTFT, end to end), on a generation's span."""
    batch, prompt = shape
    tracing.set_attributes(
        current,
        **{
            "gen_ai.usage.input_tokens": batch * prompt,
            "gen_ai.usage.output_tokens": batch * len(clock.times),
            "gen_ai.latency.time_to_first_token": clock.time_to_first_token if clock.times else None,
            "gen_ai.latency.e2e": time.perf_counter() - clock.started,
        },
    )


def _check_ids(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape [batch, tokens]")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(input_ids.shape)}"
        )
