"""LoRA adapters as a client uses them: a session asks its servers for an adapter they serve, by name,
or sends its own (a PEFT folder loaded here with `model.load_adapter`), each server getting only its
blocks' share, kept for that session alone."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from blocks.adapters import NAME_PATTERN, AdapterError, LoraAdapter, check_adapter, load_adapter
from blocks.checkpoint import Checkpoint
from dht.records import ServerInfo

KEEP_SPANS = 32  # the client's own adapters' per-span tensors kept loaded (least recently used go)


@dataclass(frozen=True)
class SessionAdapter:
    """The adapter a session runs with: `own` when the client sends it (else servers must serve it)."""

    name: str
    own: bool = False

    def served_by(self, info: ServerInfo) -> bool:
        record = info.record
        return record.client_adapter_bytes > 0 if self.own else self.name in record.adapters


class LocalAdapters:
    """The client's own adapters, by name, and their tensors for the spans that asked for them."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.paths: dict[str, Path] = {}
        self._spans: collections.OrderedDict[tuple[str, int, int], LoraAdapter] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, path: str | Path, name: Optional[str] = None) -> str:
        """Checks the adapter at `path` against the model (every tensor, once) and keeps it as `name`
        (default: its folder's name); raises AdapterError saying what is wrong."""
        import re

        path = Path(path).expanduser().resolve()
        name = name or path.name
        if not re.match(NAME_PATTERN, name):
            raise AdapterError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        check_adapter(path, self.checkpoint.config, name)
        with self._lock:
            self.paths[name] = path
            for key in [key for key in self._spans if key[0] == name]:
                del self._spans[key]
        return name

    def session_adapter(self, name: Optional[str]) -> Optional[SessionAdapter]:
        if not name:
            return None
        return SessionAdapter(name, own=name in self.paths)

    def for_span(self, name: str, start: int, end: int) -> Optional[LoraAdapter]:
        """The client's own adapter `name` for blocks [start, end) in float32 (None: it has none such)."""
        path = self.paths.get(name)
        if path is None:
            return None
        key = (name, start, end)
        with self._lock:
            if key in self._spans:
                self._spans.move_to_end(key)
                return self._spans[key]
        adapter = load_adapter(path, self.checkpoint.config, start, end, torch.float32, name=name)
        with self._lock:
            self._spans[key] = adapter
            while len(self._spans) > KEEP_SPANS:
                self._spans.popitem(last=False)
        return adapter
