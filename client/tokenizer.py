"""The checkpoint's tokenizer, as `AutoTokenizer` would choose it, without its start-up cost where
the choice is known.

`AutoTokenizer.from_pretrained` always builds the model's config class first, and in transformers 5
that imports much of its modeling code (about 2 s of a one-line client's start). When
`tokenizer_config.json` names the generic fast tokenizer and the model type is one whose checkpoints
transformers takes at their word, AutoTokenizer ends up with that generic class anyway: it is loaded
directly. Anything else goes through AutoTokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# Model types Swarm serves for which transformers keeps a checkpoint's generic tokenizer class (it
# overrides the class for others, e.g. qwen2, whose hub configs it knows to be wrong).
TRUSTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen3"})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of the checkpoint at `path` (OSError or ValueError if it has none)."""
    path = Path(path)
    settings = _read_json(path / "tokenizer_config.json")
    model_type = _read_json(path / "config.json").get("model_type")
    if (
        settings.get("tokenizer_class") in GENERIC_CLASSES
        and "auto_map" not in settings
        and model_type in TRUSTED_MODEL_TYPES
        and (path / "tokenizer.json").is_file()
    ):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
