"""Speculative decoding: tokens drafted locally, all verified in one trip through the chain.

Over real links every token costs a full trip through the swarm. A draft of k likely next tokens is
sent with the step; the servers compute all of them at once and the client keeps the longest prefix
the model agrees with, plus the model's own next token: up to k + 1 tokens for one trip. The servers
then forget the rejected positions (a rewind of their KV, in place).

Drafts come from n-grams of the context (`prompt_lookup_num_tokens`, no model) or from a small local
model (`assistant_model`), as transformers names them. Greedy output is token-identical to plain
greedy decoding; sampling uses the standard rejection scheme (accept a draft token x with
probability min(1, p(x)/q(x)), else sample from the normalised max(0, p − q)), which leaves the
output distribution unchanged. The draft length adapts: it grows while drafts are accepted whole
and shrinks to what was accepted otherwise, so free text pays little for drafts that fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

DEFAULT_NGRAM = 2  # transformers' default `max_matching_ngram_size`
DEFAULT_ASSISTANT_TOKENS = 20  # transformers' default `num_assistant_tokens`


@dataclass
class Draft:
    """Tokens drafted for the positions after the context, and the drafter's distribution at each
    (None: a deterministic draft, probability 1 for its token)."""

    tokens: torch.Tensor  # [d] token ids
    probs: Optional[torch.Tensor] = None  # [d, vocab]


class PromptLookup:
    """Drafts the tokens that followed the latest earlier occurrence of the context's last n-gram
    (n from `max_ngram` down to 1): copying, editing and quoting reuse long runs of the prompt."""

    def __init__(self, max_ngram: int = DEFAULT_NGRAM):
        if max_ngram < 1:
            raise ValueError(f"max_matching_ngram_size must be at least 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def draft(self, ids: torch.Tensor, size: int, sample: bool) -> Draft:
        row = ids[0]
        length = row.shape[0]
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            tail = row[length - n :]
            windows = row[: length - 1].unfold(0, n, 1)  # every earlier n-gram that has a token after it
            found = (windows == tail).all(dim=1).nonzero()
            if found.numel():
                start = int(found[-1]) + n
                return Draft(row[start : start + size].clone())
        return Draft(row[:0].clone())

    def accepted(self, position: int) -> None:
        """Prompt lookup keeps no state."""


class AssistantDrafter:
    """Drafts with a small local `transformers` model of the same vocabulary, keeping its own KV
    cache of the context (cropped back to what the swarm accepted). Its scores go through the same
    logits `processors` as the model's, so that its drafts are likely to be accepted."""

    def __init__(self, model: Any, vocab_size: int, processors=None):
        assistant_vocab = model.get_output_embeddings().weight.shape[0]
        if assistant_vocab != vocab_size:
            raise ValueError(
                f"assistant_model has a vocabulary of {assistant_vocab} tokens, the model {vocab_size}: "
                f"drafts must use the same tokens"
            )
        self.model = model.eval()
        self.processors = processors
        self.device = next(model.parameters()).device
        self.cache: Any = None
        self.cached = 0  # context positions in `cache`

    @torch.inference_mode()
    def draft(self, ids: torch.Tensor, size: int, sample: bool) -> Draft:
        tokens, probs = [], []
        context = ids.to(self.device)
        # The cache holds at most all but the last token, whose logits the draft starts from (a
        # rollback may have cut the context below what the cache holds).
        self.accepted(min(self.cached, context.shape[1] - 1))
        for _ in range(size):
            new = context[:, self.cached :]
            out = self.model(input_ids=new, past_key_values=self.cache, use_cache=True)
            self.cache, self.cached = out.past_key_values, context.shape[1]
            logits = out.logits[:, -1].float()
            if self.processors is not None:
                logits = self.processors(context.to(ids.device), logits.to(ids.device)).to(self.device)
            if sample:
                dist = torch.softmax(logits, dim=-1)
                token = torch.multinomial(dist, 1).view(1)
                probs.append(dist[0])
            else:
                token = logits.argmax(dim=-1).view(1)
            tokens.append(token)
            context = torch.cat([context, token.view(1, 1)], dim=1)
        draft = torch.cat(tokens).to(ids.device) if tokens else ids[0, :0].clone()
        return Draft(draft, torch.stack(probs).to(ids.device) if probs else None)

    def accepted(self, position: int) -> None:
        """The context is certain up to `position` tokens (the swarm accepted them, or a rollback cut
        the rest): the cache forgets what lies beyond."""
        if self.cache is not None and self.cached > position:
            self.cache.crop(position - self.cached)  # transformers 5: a negative count of tokens to drop
            self.cached = position


@dataclass
class DraftSize:
    """k: grows by 2 after a draft accepted whole (up to `limit`), shrinks to what was accepted plus one."""

    limit: int
    size: int = 0
    drafted: int = 0
    accepted: int = 0
    traversals: int = 0
    history: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.limit < 1:
            raise ValueError(f"the number of drafted tokens must be at least 1, got {self.limit}")
        self.size = self.size or self.limit

    def update(self, drafted: int, accepted: int) -> None:
        self.traversals += 1
        self.drafted += drafted
        self.accepted += accepted
        if drafted == 0:
            return
        self.size = min(self.limit, self.size + 2) if accepted == drafted else max(1, accepted + 1)


def verify_greedy(draft: torch.Tensor, scores: list[torch.Tensor]) -> list[int]:
    """The tokens greedy decoding keeps: the draft's longest prefix that matches the model's argmax
    at each position, then the model's own token. `scores[i]` [vocab] are the processed scores at
    the position of draft token i (the last: after the whole draft)."""
    kept = []
    for i, score in enumerate(scores):
        best = int(score.argmax())
        kept.append(best)
        if i >= draft.shape[0] or best != int(draft[i]):
            break
    return kept


def verify_sampled(
    draft: torch.Tensor, draft_probs: Optional[torch.Tensor], probs: list[torch.Tensor], generator=None
) -> list[int]:
    """The tokens sampling keeps, by the rejection scheme: draft token x at position i is accepted with
    probability min(1, p_i(x) / q_i(x)); the first rejected one is replaced by a sample of the
    normalised max(0, p_i − q_i); after a draft accepted whole, one more token is sampled from the
    last p. `probs[i]` [vocab] is the model's distribution at draft position i; `draft_probs[i]` the
    drafter's (None: the draft was deterministic, q_i = 1 at its token)."""
    kept = []
    for i, p in enumerate(probs):
        if i >= draft.shape[0]:
            kept.append(int(torch.multinomial(p, 1, generator=generator)))
            break
        x = int(draft[i])
        q_x = float(draft_probs[i, x]) if draft_probs is not None else 1.0
        if float(torch.rand((), generator=generator)) * q_x < float(p[x]):
            kept.append(x)
            continue
        if draft_probs is not None:
            residual = (p - draft_probs[i]).clamp_min(0)
        else:
            residual = p.clone()
            residual[x] = 0
        total = float(residual.sum())
        kept.append(int(torch.multinomial(residual / total, 1, generator=generator)) if total > 0 else x)
        break
    return kept
