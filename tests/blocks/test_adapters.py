"""blocks.adapters: a span with a LoRA adapter computes what peft computes; what peft can express
beyond plain LoRA, and tensors that do not fit the model, are refused with the reason; sessions of
different adapters batched together each get their own output."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from blocks.adapters import AdapterConfig, AdapterError, adapter_from_tensors, check_adapter, load_adapter
from blocks.checkpoint import Checkpoint
from blocks.loading import load_head, load_span
from blocks.span import SpanInput
from blocks.synthetic import make_random_checkpoint
from tests.helpers.models import ATOL

KEY = "base_model.model.model.layers.{}.{}.lora_{}.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("base") / "llama", "llama", num_layers=3, seed=11)


def saved(base, path, seed=0, **config):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **config)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "config",
    [
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["v_proj", "down_proj"]),
        dict(r=3, lora_alpha=6, target_modules=["q_proj"], layers_to_transform=[1]),
    ],
)
def test_a_span_with_an_adapter_computes_what_peft_computes(base, tmp_path, config):
    path = saved(base, tmp_path / "adapter", **config)
    checkpoint = Checkpoint(base)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path)
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
    head = load_head(checkpoint)
    # Two spans, as two servers would hold them: each reads only its own blocks' tensors.
    first = load_span(checkpoint, 0, 1)
    second = load_span(checkpoint, 1, 3)
    hidden = first.forward(head.embed_tokens(ids), adapter=load_adapter(path, checkpoint.config, 0, 1))
    hidden = second.forward(hidden, adapter=load_adapter(path, checkpoint.config, 1, 3))
    assert torch.allclose(head.logits(hidden), expected, atol=1e-5, rtol=0)


def test_sessions_of_different_adapters_batched_together_each_get_their_own_output(base, tmp_path):
    checkpoint = Checkpoint(base)
    span = load_span(checkpoint, 0, 3)
    one = load_adapter(
        saved(base, tmp_path / "one", 1, r=2, target_modules=["q_proj", "up_proj"]), checkpoint.config, 0, 3
    )
    two = load_adapter(saved(base, tmp_path / "two", 2, r=4, target_modules=["o_proj"]), checkpoint.config, 0, 3)
    inputs = [torch.randn(1, 4, checkpoint.hidden_size) for _ in range(3)]
    alone = [span.forward(x, adapter=a) for x, a in zip(inputs, (one, None, two))]
    together = span.forward_batch([SpanInput(x, adapter=a) for x, a in zip(inputs, (one, None, two))])
    for got, want in zip(together, alone):
        assert torch.allclose(got, want, atol=ATOL, rtol=0)  # a mixed-up adapter is off by far more
    assert not torch.allclose(alone[0], span.forward(inputs[0]), atol=1e-3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peft_type": "PREFIX_TUNING"}, "only LoRA adapters"),
        ({"use_dora": True}, "not supported: use_dora"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "not supported: modules_to_save"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
    ],
)
def test_what_plain_lora_cannot_express_is_refused(base, tmp_path, change, message):
    path = saved(base, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterError, match=message):
        check_adapter(path, Checkpoint(base).config)


def test_tensors_that_do_not_fit_are_refused(base):
    arch = Checkpoint(base).config
    config = AdapterConfig(alpha=4)
    good = {
        KEY.format(0, "self_attn.q_proj", "A"): torch.randn(2, 64),
        KEY.format(0, "self_attn.q_proj", "B"): torch.randn(64, 2),
    }

    def refused(tensors, message):
        with pytest.raises(AdapterError, match=message):
            adapter_from_tensors("a", config, tensors, arch, 0, 3, torch.float32)

    refused({**good, KEY.format(0, "self_attn.q_proj", "A"): torch.randn(2, 65)}, "do not fit a 64 → 64 projection")
    refused({KEY.format(0, "self_attn.q_proj", "A"): torch.randn(2, 64)}, "without its pair")
    refused({**good, "base_model.model.lm_head.lora_A.weight": torch.randn(2, 64)}, "unexpected tensor")
    refused({**good, KEY.format(7, "mlp.up_proj", "A"): torch.randn(2, 64)}, "is for block 7; the model has 3")
    refused({**good, KEY.format(0, "self_attn.q_proj", "B"): torch.full((64, 2), float("nan"))}, "must be finite")
    refused({**good, KEY.format(0, "self_attn.q_proj", "B"): torch.randint(0, 3, (64, 2))}, "floating point")
    adapter = adapter_from_tensors("a", config, good, arch, 0, 3, torch.float32)
    assert adapter.lookup(0, "self_attn.q_proj")[2] == 2.0 and adapter.lookup(1, "self_attn.q_proj") is None
    other = adapter_from_tensors("a", config, {k: v * 2 for k, v in good.items()}, arch, 0, 3, torch.float32)
    assert adapter.digest != other.digest  # the same name with other weights keys apart
