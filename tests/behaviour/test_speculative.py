"""Speculative decoding through a live swarm: drafts verified in one trip, output exactly plain decoding's."""

from __future__ import annotations

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from harness.local_swarm import LocalSwarm

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
