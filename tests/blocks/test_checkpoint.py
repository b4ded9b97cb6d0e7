"""Checkpoints: the model name, supported families and clear errors for what cannot be served."""

from __future__ import annotations

import json

import pytest

from blocks.checkpoint import Checkpoint, validate_model_name
from blocks.errors import CheckpointError, UnsupportedModelError
from blocks.synthetic import make_random_checkpoint


def test_a_malformed_config_is_a_clear_error(tmp_path):
    path = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2)
    config = json.loads((path / "config.json").read_text())
    for bad, message in [
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_size": "wide"}, "hidden_size"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"hidden_act": "mish"}, "'mish' is not supported"),
    ]:
        (path / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises((CheckpointError, UnsupportedModelError), match=message):
            Checkpoint(path)


def test_model_name_is_derived_from_config_and_weights(tmp_path):
    a = Checkpoint(make_random_checkpoint(tmp_path / "a", "llama", seed=1))
    same = Checkpoint(make_random_checkpoint(tmp_path / "same", "llama", seed=1))
    other_weights = Checkpoint(make_random_checkpoint(tmp_path / "b", "llama", seed=2))
    assert a.default_model_name == same.default_model_name
    assert a.config_digest == other_weights.config_digest
    assert a.default_model_name != other_weights.default_model_name
    assert a.default_model_name.startswith("llama-4l-64h-")
    validate_model_name(a.default_model_name)
    for bad in ["", "a b", "x" * 200, "../etc", "name."]:
        with pytest.raises(ValueError):
            validate_model_name(bad)


def test_unsupported_or_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported; supported: llama, mistral"):
        Checkpoint(tmp_path)
