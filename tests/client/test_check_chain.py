"""A check chain sends each position of a span once, follows the span's rewinds, and keeps only the
outputs that a later check can still compare."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import torch

from client.check_chain import CheckChain
from tests.helpers.claims import claim as make_claim


class FakeSpan:
    """Stands in for a server's session: records what it is sent and where it was rewound to."""

    def __init__(self, peer_id: str):
        self.plan = SimpleNamespace(peer_id=peer_id)
        self.received: list[torch.Tensor] = []
        self.rewound_to: list[int] = []

    def rewind(self, position: int) -> None:
        self.rewound_to.append(position)


async def step(span, hidden, mask):
    span.received.append(hidden)
    return hidden + 1


def claim(inputs, verified=0, rewinds=()):
    return dataclasses.replace(make_claim(inputs, inputs, verified), rewinds=tuple(rewinds), session_id="s")


def test_each_position_is_sent_once_and_the_outputs_cover_what_is_left_to_compare():
    spans = [FakeSpan("A"), FakeSpan("B")]
    chain = CheckChain(spans)
    inputs = torch.arange(10.0).reshape(1, 10, 1)
    since, outputs = asyncio.run(chain.advance(claim(inputs[:, :4]), step, chunk=3))
    assert since == 0 and torch.equal(outputs, inputs[:, :4] + 2)
    assert [t.shape[1] for t in spans[0].received] == [3, 1]
    since, outputs = asyncio.run(chain.advance(claim(inputs, verified=4), step, chunk=3))
    assert chain.sent == 10 and since <= 4
    assert torch.equal(outputs[:, 4 - since :], inputs[:, 4:] + 2)
    assert not spans[0].rewound_to


def test_a_rewind_of_the_span_rewinds_the_chain_and_resends_only_what_follows():
    spans = [FakeSpan("A")]
    chain = CheckChain(spans)
    inputs = torch.arange(8.0).reshape(1, 8, 1)
    asyncio.run(chain.advance(claim(inputs), step, chunk=8))
    changed = torch.cat([inputs[:, :5], -inputs[:, 5:]], dim=1)
    since, outputs = asyncio.run(chain.advance(claim(changed, verified=5, rewinds=[5]), step, chunk=8))
    assert spans[0].rewound_to == [5] and chain.sent == 11
    assert since <= 5 and torch.equal(outputs[:, 5 - since :], changed[:, 5:] + 1)
    # A later claim with no new rewind sends nothing more.
    asyncio.run(chain.advance(claim(changed, verified=8, rewinds=[5]), step, chunk=8))
    assert chain.sent == 11 and spans[0].rewound_to == [5]
