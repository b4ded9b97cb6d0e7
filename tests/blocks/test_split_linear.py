"""A linear over few rows, computed over row blocks of its weight, gives what the layer itself gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blocks import split_linear
from blocks.quantization import quantize_layer
from blocks.split_linear import linear


def layer(inputs: int, outputs: int, bias: bool, dtype=torch.float32) -> nn.Linear:
    generator = torch.Generator().manual_seed(outputs)
    module = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        module.weight.copy_(torch.randn(outputs, inputs, generator=generator))
        if bias:
            module.bias.copy_(torch.randn(outputs, generator=generator))
    return module.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 2, 64), (split_linear.MAX_ROWS, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_give_the_layers_own_output(shape, bias):
    module = layer(64, 96, bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, expected = linear(module, x), module(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_split_covers_every_thread_count(monkeypatch):
    """Row blocks of any count put every output in its own place (outputs not a multiple fall back)."""
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    for threads in (1, 2, 3, 4, 5):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        for outputs in (60, 61):
            module = layer(32, outputs, bias=True)
            torch.testing.assert_close(linear(module, x), module(x), rtol=1e-5, atol=1e-5)


def test_what_is_not_read_faster_goes_through_the_layer(monkeypatch):
    """bfloat16, many rows, int8 weights (which still report float32) and modules other than a plain
    Linear are left to the layer itself."""
    int8 = quantize_layer(nn.Sequential(layer(64, 32, bias=False)), "int8", "cpu")[0]
    assert int8.weight.dtype == torch.float32
    calls = []
    monkeypatch.setattr(torch, "bmm", lambda *args: calls.append(args) or pytest.fail("bmm used"))
    half = layer(16, 8, bias=False, dtype=torch.bfloat16)
    linear(half, torch.randn(1, 16, dtype=torch.bfloat16))
    linear(layer(16, 8, bias=False), torch.randn(split_linear.MAX_ROWS + 1, 16))
    linear(nn.Identity(), torch.randn(1, 16))
    with torch.inference_mode():
        x = torch.randn(1, 64)
        assert torch.equal(linear(int8, x), int8(x))
    assert calls == []
