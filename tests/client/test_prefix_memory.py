"""What the client remembers of finished prompts: the longest shared whole blocks, never a whole prompt,
one entry per conversation, within its byte budget."""

from __future__ import annotations

import torch

from client.prefix_memory import PrefixMemory, RememberedSpan, common_blocks


def spans(tokens: int, peers=("a", "b")) -> list[RememberedSpan]:
    return [
        RememberedSpan(peer, i * 2, i * 2 + 2, torch.randn(1, tokens, 8), torch.randn(1, tokens, 8))
        for i, peer in enumerate(peers)
    ]


def test_whole_blocks_shared_at_the_start_are_found_but_never_the_whole_prompt():
    memory = PrefixMemory(2**20)
    ids = torch.arange(64)
    memory.remember(ids, spans(64))
    assert memory.lookup(torch.cat([ids[:40], torch.tensor([999] * 30)]))[1] == 32
    assert memory.lookup(ids)[1] == 48  # the last token is computed for its logits: 63 usable, 3 blocks
    assert memory.lookup(torch.arange(1, 80))[0] is None
    assert common_blocks(torch.arange(20), torch.arange(18)) == 16


def test_the_next_turn_replaces_the_last_and_the_budget_drops_the_oldest():
    first = torch.arange(32)
    one_entry = 32 * 8 + 2 * 2 * 32 * 8 * 4
    memory = PrefixMemory(2 * one_entry + 10)
    memory.remember(first, spans(32))
    memory.remember(torch.arange(48), spans(48))  # the same conversation, one turn on
    assert memory.nbytes == 48 * 8 + 2 * 2 * 48 * 8 * 4
    entry, tokens = memory.lookup(torch.arange(60))
    assert tokens == 48 and entry.chain == [("a", 0, 2), ("b", 2, 4)]
    other, third = torch.arange(100, 132), torch.arange(200, 232)
    memory.remember(other, spans(32))
    memory.remember(third, spans(32))
    assert memory.lookup(torch.arange(60))[0] is None  # the oldest went over the budget
    assert memory.lookup(torch.cat([third, third]))[1] == 32
    assert PrefixMemory(0).lookup(first) == (None, 0)
