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


def test_a_lying_server_is_caught_under_speculation_and_its_work_redone(model6, ref6, tmp_path):
    ids = repetitive_prompt()
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
                output = model.generate(ids, max_new_tokens=NEW_TOKENS, prompt_lookup_num_tokens=8)
            assert liar.peer_id in model.convicted
    assert torch.equal(output, expected)


def test_sampling_with_prompt_lookup_generates_every_token_asked_for(model):
    ids = repetitive_prompt()
    torch.manual_seed(0)
    for temperature in (1.0, 0.7):
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            output = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                prompt_lookup_num_tokens=8,
                session=session,
            )
            assert output.shape == (1, ids.shape[1] + NEW_TOKENS)
            assert torch.equal(output[:, : ids.shape[1]], ids)
            assert session.position == output.shape[1] - 1 and session.draft_size.traversals <= NEW_TOKENS
