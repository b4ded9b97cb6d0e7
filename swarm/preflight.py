"""Checks of a server's options against the checkpoint's `config.json` alone.

They run before torch and hivemind are imported, so that `python -m swarm.serve` with a wrong
model path or block range answers at once instead of after seconds of imports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from blocks.architecture import Architecture
from blocks.errors import CheckpointError
from configs.schema import ServerOptions

QUANT_LIBRARIES = {"int8": "torchao", "nf4": "bitsandbytes"}


def check_model_and_blocks(options: ServerOptions) -> Architecture:
    """The checkpoint's architecture; raises `CheckpointError`/`ValueError` naming what is wrong."""
    path = Path(options.model).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: config.json not found")
    arch = Architecture.from_file(path / "config.json")
    blocks = arch.num_hidden_layers
    if options.block_range is not None:
        if options.block_range[1] > blocks:
            raise ValueError(f"--blocks {options.blocks} is outside the model: it has {blocks} blocks (0:{blocks})")
    elif options.num_blocks is not None and options.num_blocks > blocks:
        raise ValueError(f"--num-blocks {options.num_blocks} exceeds the model's {blocks} blocks")
    library = QUANT_LIBRARIES.get(options.quant)
    if library is not None and importlib.util.find_spec(library) is None:
        raise ValueError(
            f"--quant {options.quant} needs {library}, which is not installed: "
            "pip install 'swarm-inference[quant]' (scripts/install.sh installs it)"
        )
    return arch
