"""Generation through real local swarms equals single-process transformers."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoTokenizer, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from client import BadRequestError, TokenClock

pytestmark = pytest.mark.slow

NEW_TOKENS = 24


def prompts(batch: int, length: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (batch, length), generator=generator)


@pytest.mark.parametrize("batch", [1, 2])
def test_llama_two_servers_greedy_matches_transformers(llama_client, llama_ref, batch):
    ids = prompts(batch)
    expected = llama_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    output = llama_client.generate(ids, max_new_tokens=NEW_TOKENS)
    assert output.shape == (batch, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(output, expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_qwen2_three_uneven_servers_greedy_matches_transformers(qwen2_client, qwen2_ref, batch):
    ids = prompts(batch, length=9, seed=1)
    expected = qwen2_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    output = qwen2_client.generate(ids, max_new_tokens=NEW_TOKENS)
    assert output.shape == (batch, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(output, expected)


@pytest.mark.parametrize("client_name, ref_name", [("llama_client", "llama_ref"), ("qwen2_client", "qwen2_ref")])
def test_prefill_logits_match(request, client_name, ref_name):
    client, ref = request.getfixturevalue(client_name), request.getfixturevalue(ref_name)
    ids = prompts(2, length=11, seed=3)
    with torch.no_grad():
        expected = ref(ids).logits
    logits = client(ids).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_session_continues_across_generate_calls(llama_client, llama_ref):
    ids = prompts(1, seed=4)
    extra = prompts(1, length=3, seed=5)
    with llama_client.inference_session(max_length=64) as session:
        first = llama_client.generate(ids, max_new_tokens=8, session=session)
        second = llama_client.generate(None, max_new_tokens=12, session=session)
        third = llama_client.generate(extra, max_new_tokens=5, session=session)
    assert torch.equal(first, llama_ref.generate(ids, max_new_tokens=8, do_sample=False))
    assert torch.equal(second, llama_ref.generate(ids, max_new_tokens=20, do_sample=False))
    continued = torch.cat([second, extra], dim=1)
    assert torch.equal(third, llama_ref.generate(continued, max_new_tokens=5, do_sample=False))


def test_a_request_that_cannot_fit_is_refused_before_anything_is_generated(llama_client):
    ids = prompts(1, length=8, seed=6)
    clock = TokenClock()
    with llama_client.inference_session(max_length=12) as session:
        with pytest.raises(BadRequestError, match="need a session of 13 tokens; .* opened with max_length=12"):
            llama_client.generate(ids, max_new_tokens=5, session=session, streamer=clock)
        assert session.position == 0 and clock.times == []
        assert llama_client.generate(ids, max_new_tokens=4, session=session).shape == (1, 12)  # what fits works
    context = llama_client.config.max_position_embeddings
    with pytest.raises(BadRequestError, match=f"exceeds the model's context of {context} tokens"):
        llama_client.generate(ids, max_new_tokens=context)


def test_left_padded_batch_matches_transformers(llama_client, llama_ref):
    ids = prompts(2, length=8, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second prompt is 3 tokens shorter, padded on the left
    ids[1, :3] = 0
    expected = llama_ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    output = llama_client.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(output, expected)


def test_streamers_receive_tokens_as_they_come(llama_client, llama_path):
    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    ids = prompts(1, seed=7)
    collect = Collect()
    output = llama_client.generate(ids, max_new_tokens=10, streamer=collect)
    assert collect.ended
    assert torch.equal(collect.puts[0], ids)  # the prompt first, as transformers does
    assert torch.equal(torch.cat([p.reshape(-1) for p in collect.puts[1:]]), output[0, ids.shape[1] :])

    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=llama_client.generate(ids, max_new_tokens=10, streamer=streamer))
    )
    thread.start()
    text = "".join(streamer)
    thread.join(60)
    assert text == tokenizer.decode(result["out"][0, ids.shape[1] :])


def test_a_streamer_that_raises_stops_its_generation_and_the_session_goes_on(llama_client, llama_ref):
    """Generations run on the client's event loop, their streamers on the callers' threads: an error
    in one reaches its caller, after the generation stopped with its session consistent."""

    class FailsAtTheFourthToken(BaseStreamer):
        def __init__(self):
            self.threads, self.puts, self.ended = set(), 0, False

        def put(self, value):
            self.threads.add(threading.get_ident())
            self.puts += 1
            if self.puts == 5:  # the prompt, then tokens
                raise RuntimeError("the terminal went away")

        def end(self):
            self.ended = True

    ids = prompts(1, seed=8)
    streamer = FailsAtTheFourthToken()
    with llama_client.inference_session(max_length=64) as session:
        with pytest.raises(RuntimeError, match="the terminal went away"):
            llama_client.generate(ids, max_new_tokens=30, session=session, streamer=streamer)
        assert streamer.threads == {threading.get_ident()} and streamer.ended
        stopped = session.token_ids.shape[1]
        assert stopped >= ids.shape[1] + 4
        rest = llama_client.generate(None, max_new_tokens=ids.shape[1] + 30 - stopped, session=session)
    assert torch.equal(rest, llama_ref.generate(ids, max_new_tokens=30, do_sample=False))


def test_a_stuck_streamer_holds_up_no_other_generation(llama_client, llama_ref):
    release = threading.Event()

    class Stuck(BaseStreamer):
        def put(self, value):
            release.wait(60)

        def end(self):
            pass

    ids, other = prompts(1, seed=9), prompts(1, seed=10)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=llama_client.generate(ids, max_new_tokens=6, streamer=Stuck()))
    )
    thread.start()
    try:
        output = llama_client.generate(other, max_new_tokens=6)
        assert thread.is_alive()  # its caller is still in the streamer's first call
    finally:
        release.set()
        thread.join(60)
    assert torch.equal(output, llama_ref.generate(other, max_new_tokens=6, do_sample=False))
    assert torch.equal(result["out"], llama_ref.generate(ids, max_new_tokens=6, do_sample=False))


def test_sampling_respects_arguments(llama_client):
    ids = prompts(1, seed=8)
    greedy = llama_client.generate(ids, max_new_tokens=10)
    torch.manual_seed(0)
    top1 = llama_client.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(top1, greedy)  # top-k 1 leaves only the argmax
    torch.manual_seed(0)
    sampled = llama_client.generate(ids, max_new_tokens=10, do_sample=True, temperature=5.0, top_p=0.99)
    assert sampled.shape == greedy.shape and not torch.equal(sampled, greedy)
    assert int(sampled.max()) < llama_client.config.vocab_size
    with pytest.raises(TypeError, match="num_bananas"):
        llama_client.generate(ids, max_new_tokens=2, num_bananas=3)


def test_long_prompts_are_sent_in_chunks(llama_swarm, llama_path, llama_ref):
    from client import AutoDistributedModelForCausalLM

    ids = prompts(2, length=23, seed=9)
    with AutoDistributedModelForCausalLM.from_pretrained(
        llama_path, llama_swarm.initial_peers, max_chunk_tokens=4
    ) as model:
        assert torch.equal(
            model.generate(ids, max_new_tokens=6),
            llama_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False),
        )
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, llama_ref(ids).logits, atol=1e-4, rtol=1e-4)
