"""Speculative decoding through a live swarm: drafts verified in one trip, output exactly plain decoding's."""

from __future__ import annotations

import warnings

import pytest
import torch

from client import AutoDistributedModelForCausalLM, WrongResultWarning
from harness.local_swarm import LocalSwarm
from tests.helpers.models import wait_for_route
from tests.helpers.streamers import AtToken

pytestmark = pytest.mark.slow

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def swarm(model6, tmp_path_factory):
    with LocalSwarm(model6, [(0, 3), (3, 6)], workdir=tmp_path_factory.mktemp("speculative")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def model(model6, swarm):
    with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
        model.generation_config.eos_token_id = None
        yield model


def repetitive_prompt() -> torch.Tensor:
    """A prompt that repeats itself, as a copy or edit task's does."""
    run = torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(3))
    return torch.cat([run, run, run[:6]])[None]


def test_prompt_lookup_greedy_is_token_identical_and_takes_fewer_trips(model, ref6):
    ids = repetitive_prompt()
    expected = ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        output = model.generate(ids, max_new_tokens=NEW_TOKENS, prompt_lookup_num_tokens=8, session=session)
        stats = session.draft_size
    assert torch.equal(output, expected)
    assert stats.accepted > 0 and stats.traversals < NEW_TOKENS
    assert stats.accepted <= stats.drafted


def test_an_assistant_model_drafts_and_the_output_is_unchanged(model, ref6, model6):
    from tests.helpers.models import reference_model

    ids = repetitive_prompt()[:, :9]
    expected = ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assistant = reference_model(model6)  # the same model: every draft is accepted
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        output = model.generate(ids, max_new_tokens=NEW_TOKENS, assistant_model=assistant, session=session)
        stats = session.draft_size
    assert torch.equal(output, expected)
    assert stats.traversals < NEW_TOKENS // 2 and stats.accepted == stats.drafted


def test_a_generation_argument_that_is_not_implemented_is_refused(model):
    ids = repetitive_prompt()
    with pytest.raises(TypeError, match="no_repeat_ngram_size"):
        model.generate(ids, max_new_tokens=2, no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="batch of 1"):
        model.generate(torch.cat([ids, ids]), max_new_tokens=2, prompt_lookup_num_tokens=4)
    with pytest.raises(ValueError, match="positive"):
        model.generate(ids, max_new_tokens=2, prompt_lookup_num_tokens=0)


def test_a_server_killed_mid_speculation_is_replaced_and_the_output_is_unchanged(model6, ref6, tmp_path):
    ids = repetitive_prompt()
    expected = ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    splits = [(0, 3), (3, 6), (3, 6)]
    with LocalSwarm(model6, splits, server_args=["--throughput", "100"], workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            model.generation_config.eos_token_id = None
            with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                streamer = AtToken(10, lambda: swarm.server(session.chain[-1][0]).kill())
                output = model.generate(
                    ids, max_new_tokens=NEW_TOKENS, prompt_lookup_num_tokens=8, session=session, streamer=streamer
                )
                assert session.failovers >= 1 and session.draft_size.accepted > 0
    assert torch.equal(output, expected)


@pytest.mark.parametrize("drafter", ["prompt lookup", "assistant model"])
def test_a_lying_server_is_caught_under_speculation_and_its_work_redone(model6, ref6, tmp_path, drafter):
    """The rollback cuts the context under the drafter too (an assistant's own cache included)."""
    ids = repetitive_prompt()
    speculation = {"prompt_lookup_num_tokens": 8} if drafter == "prompt lookup" else {"assistant_model": ref6}
    expected = ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    with LocalSwarm(model6, [(0, 6)], server_args=["--throughput", "100"], workdir=tmp_path / "swarm") as swarm:
        liar = swarm.add_server(0, 6, "--throughput", "10000", module="tests.helpers.lying_server")
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=60, verify=0.5
        ) as model:
            model.generation_config.eos_token_id = None
            wait_for_route(model, liar.peer_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", WrongResultWarning)
                output = model.generate(ids, max_new_tokens=NEW_TOKENS, **speculation)
            assert liar.peer_id in model.convicted
    assert torch.equal(output, expected)


@pytest.mark.parametrize("drafter", ["prompt lookup", "assistant model"])
def test_sampling_with_speculation_generates_every_token_asked_for(model, ref6, drafter):
    ids = repetitive_prompt()
    speculation = {"prompt_lookup_num_tokens": 8} if drafter == "prompt lookup" else {"assistant_model": ref6}
    torch.manual_seed(0)
    for temperature in (1.0, 0.7):
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            output = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                session=session,
                **speculation,
            )
            assert output.shape == (1, ids.shape[1] + NEW_TOKENS)
            assert torch.equal(output[:, : ids.shape[1]], ids)
            assert session.position == output.shape[1] - 1 and session.draft_size.traversals <= NEW_TOKENS


CHI2_DF7_P001 = 24.322  # chi-square critical value, 7 degrees of freedom, significance 0.001


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_with_speculation_keeps_the_models_distribution(tmp_path):
    """Through a live swarm, on a vocabulary of 8: the first sampled token after a prompt whose last
    2-gram occurred before (so prompt lookup drafts it, and the rejection scheme decides), and the
    token after it where the draft was kept (sampled in the same trip), follow the model's own
    distributions by transformers (chi-square at significance 0.001, 1 500 samples, fixed seed)."""
    from blocks.synthetic import make_random_checkpoint
    from tests.helpers.models import reference_model

    path = make_random_checkpoint(tmp_path / "tiny-vocab", "llama", num_layers=2, vocab_size=8, seed=4)
    reference = reference_model(path)
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]])
    temperature = 2.0  # flattens the random model's distribution: every token is drawn often enough
    with torch.no_grad():
        first_p = torch.softmax(reference(ids).logits[0, -1] / temperature, dim=-1)
        drafted = 3  # what prompt lookup drafts after "1 2"
        after = reference(torch.cat([ids, torch.tensor([[drafted]])], dim=1)).logits[0, -1]
        second_p = torch.softmax(after / temperature, dim=-1)
    samples = 1500
    first, second = torch.zeros(8), torch.zeros(8)
    with LocalSwarm(path, [(0, 2)], workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, verify=0) as model:
            model.generation_config.eos_token_id = None
            torch.manual_seed(0)
            with model.inference_session(max_length=ids.shape[1] + 2) as session:
                for _ in range(samples):
                    session.rewind(0)
                    session.token_ids = session.attention_mask = None
                    output = model.generate(
                        ids,
                        max_new_tokens=2,
                        do_sample=True,
                        temperature=temperature,
                        top_k=0,
                        prompt_lookup_num_tokens=2,
                        session=session,
                    )
                    first[output[0, -2]] += 1
                    if output[0, -2] == drafted:
                        second[output[0, -1]] += 1
                assert session.draft_size.drafted > 0
    assert chi_square(first, first_p) < CHI2_DF7_P001, (first, first_p)
    assert chi_square(second, second_p) < CHI2_DF7_P001, (second, second_p)


def test_speculative_sessions_batched_with_plain_ones_each_generate_their_own_output(model, ref6):
    """Three threads at once on the same servers, two with prompt lookup and one without: their steps
    are batched together, and each output is transformers' greedy output for its prompt."""
    import threading

    base = repetitive_prompt()
    prompts = [base, base[:, 2:], base[:, 5:]]
    speculate = [True, True, False]
    outputs: dict[int, torch.Tensor] = {}

    def run(index: int) -> None:
        extra = {"prompt_lookup_num_tokens": 6} if speculate[index] else {}
        outputs[index] = model.generate(prompts[index], max_new_tokens=NEW_TOKENS, **extra)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for index, ids in enumerate(prompts):
        expected = ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert torch.equal(outputs[index], expected), index
