"""client.load_tokenizer: the tokenizer AutoTokenizer would give, the same ids and chat template."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from blocks.synthetic import make_char_tokenizer, make_random_checkpoint
from client import load_tokenizer

TEXTS = ["Hello, swarm", "", "a  b\tc", "~!@#$%^&*()"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_same_tokenizer_as_auto_tokenizer(family, tmp_path):
    path = make_random_checkpoint(tmp_path / family, family, num_layers=1, seed=3)
    make_char_tokenizer(path)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    fast, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(fast) is type(auto)
    for text in TEXTS:
        assert fast(text).input_ids == auto(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert fast.apply_chat_template(chat, tokenize=False) == auto.apply_chat_template(chat, tokenize=False)
    assert (fast.bos_token_id, fast.eos_token_id) == (auto.bos_token_id, auto.eos_token_id)


def test_a_checkpoint_without_a_tokenizer_is_an_error(tmp_path):
    path = make_random_checkpoint(tmp_path / "bare", "llama", num_layers=1, seed=3)
    with pytest.raises((OSError, ValueError)):
        load_tokenizer(path)
