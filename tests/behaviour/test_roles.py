"""Prefill and decode servers: a long prompt is computed on a prefill server, then its KV cache moves
to a decode server of the same blocks, where the session goes on (nothing replayed); a short prompt
goes straight to a decode server, and a prompt whose start the decode server holds in its prefix
cache moves only the rest; every output is transformers'."""

from __future__ import annotations

import torch

from client import AutoDistributedModelForCausalLM
from harness.local_swarm import LocalSwarm

NEW_TOKENS = 12


def test_a_long_prompt_prefills_on_a_prefill_server_and_decodes_on_a_decode_server(model6, ref6, tmp_path):
    longer_prompt = torch.randint(3, 100, (1, 400), generator=torch.Generator().manual_seed(1))
    long_prompt, short_prompt = longer_prompt[:, :300], longer_prompt[:, :3]
    with LocalSwarm(model6, [], workdir=tmp_path / "swarm") as swarm:
        prefill = swarm.add_server(0, 6, "--role", "prefill", "--throughput", "100", wait=False)
        decode = swarm.add_server(0, 6, "--role", "decode", "--throughput", "100", wait=False)
        for server in swarm.servers:
            swarm.wait_online(server)
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers) as model:
            # the longer prompt starts as the long one: the decode server, which kept that one's
            # 18 whole blocks in its prefix cache, imports only the other 112 positions
            for ids, moves in ((long_prompt, 1), (short_prompt, 0), (longer_prompt, 1)):
                with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                    output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
                    assert session.chain == [(decode.peer_id, 0, 6)]
                    assert (session.moves, session.replayed_tokens, session.failovers) == (moves, 0, 0)
                expected = ref6.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
                )
                assert torch.equal(output, expected)
            assert model.convicted == {}
        log = prefill.log_path.read_text()
        assert f"handed 300 positions to {decode.peer_id} (300 of them sent, 0 cached there)" in log, log[-2000:]
        assert f"handed 400 positions to {decode.peer_id} (112 of them sent, 288 cached there)" in log, log[-2000:]
        assert "(288 positions from this server's prefix cache)" in decode.log_path.read_text()
