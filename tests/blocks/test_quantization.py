"""blocks.quantization: quantized spans take the memory announced for them, the same weights every
time, and loading one never holds more than the quantized blocks and one block at full precision."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_span
from blocks.quantization import bytes_per_weight, is_quantized, quantize_layer, resident_bytes, valid_quant
from blocks.synthetic import make_random_checkpoint


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Blocks big enough that the projections' weights are nearly all of them."""
    return make_random_checkpoint(
        tmp_path_factory.mktemp("wide") / "llama", "llama", num_layers=2, seed=4, hidden_size=256, intermediate_size=704
    )


def test_only_the_projections_weights_are_quantized():
    assert is_quantized("self_attn.q_proj.weight") and is_quantized("mlp.down_proj.weight")
    assert not is_quantized("self_attn.q_proj.bias") and not is_quantized("input_layernorm.weight")
    assert bytes_per_weight("none", torch.bfloat16) == 2 and bytes_per_weight("int8", torch.float32) == 1
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        valid_quant("int4")


@pytest.mark.parametrize("quant, share", [("int8", 0.27), ("nf4", 0.15)])
def test_a_quantized_span_holds_what_its_estimate_says(quant, share, wide):
    checkpoint = Checkpoint(wide)
    full = resident_bytes(load_span(checkpoint, 0, 2).layers)
    span = load_span(checkpoint, 0, 2, quant=quant)
    held = resident_bytes(span.layers)
    assert held <= share * full
    estimate = sum(checkpoint.block_bytes(i, torch.float32, quant) for i in range(2))
    assert abs(held - estimate) <= 0.05 * estimate
    assert span.quant == quant and span.dtype == torch.float32


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantizing_is_deterministic_and_close_to_full_precision(quant, wide):
    checkpoint = Checkpoint(wide)
    hidden = torch.randn(2, 5, checkpoint.hidden_size)
    first, second = (load_span(checkpoint, 0, 2, quant=quant).forward(hidden) for _ in range(2))
    assert torch.equal(first, second)
    exact = load_span(checkpoint, 0, 2).forward(hidden)
    error = float(((first - exact).norm(dim=-1) / exact.norm(dim=-1)).max())
    assert 0 < error < (0.05 if quant == "int8" else 0.6)


def test_a_layer_without_projections_or_mode_none_is_left_alone(wide):
    layer = load_span(Checkpoint(wide), 0, 1).layers[0]
    weight = layer.self_attn.q_proj.weight
    assert quantize_layer(layer, "none", "cpu").self_attn.q_proj.weight is weight


PEAK = """
import sys, threading, time, psutil
from blocks.checkpoint import Checkpoint
from blocks.loading import load_span
checkpoint = Checkpoint(sys.argv[1])
load_span(checkpoint, 0, 1, quant=sys.argv[2])  # libraries imported and warmed before the baseline
process, peak, done = psutil.Process(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.0005)
before = process.memory_info().rss
watcher = threading.Thread(target=watch)
watcher.start()
span = load_span(checkpoint, 0, checkpoint.num_blocks, quant=sys.argv[2])
done.set()
watcher.join()
print((max(peak[0], process.memory_info().rss) - before) // 1024)
"""


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_loading_never_holds_the_whole_span_at_full_precision(quant, tmp_path):
    path = make_random_checkpoint(
        tmp_path / "big", "llama", num_layers=8, seed=6, hidden_size=512, intermediate_size=1536
    )
    checkpoint = Checkpoint(path)
    one_block = checkpoint.block_bytes(0, torch.float32) // 1024  # KiB
    quantized = sum(checkpoint.block_bytes(i, torch.float32, quant) for i in range(8)) // 1024
    run = subprocess.run([sys.executable, "-c", PEAK, str(path), quant], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout.split()[-1])
    # What the quantized span holds, and about two blocks at full precision on the way (the block
    # being read, and one projection's temporaries): never the 8 of them (8 × one_block). Measured:
    # int8 quantized + 2.0 blocks, nf4 quantized + 2.0 blocks.
    assert 0.8 * quantized <= growth <= quantized + 3 * one_block, (growth, quantized, one_block)
