"""Instances an operator's controller tells the relay about (`/instances/refresh`, seed
`motor-coordinator-api`), and which instances are taken offline (`/v1/instances/offline|online`, seed
`mindie-coordinator-api`). Registered workers are instances too, under their worker id; the
controller's entries describe endpoints the relay does not discover itself.

Kept in memory: the controller re-sends its full view (`event: set`) after a relay restart.
"""

from __future__ import annotations

from typing import Iterable

from relay.schemas import Instance


class Instances:
    def __init__(self) -> None:
        self.declared: dict[int, Instance] = {}
        self.offline: set[int] = set()

    def refresh(self, event: str, instances: Iterable[Instance]) -> int:
        """Applies an add/del/set event; returns how many instances it named."""
        instances = list(instances)
        if event == "set":
            self.declared = {instance.id: instance for instance in instances}
        elif event == "add":
            self.declared.update({instance.id: instance for instance in instances})
        else:
            for instance in instances:
                self.declared.pop(instance.id, None)
                self.offline.discard(instance.id)
        return len(instances)

    def set_offline(self, ids: Iterable[int], offline: bool) -> None:
        for instance_id in ids:
            if offline:
                self.offline.add(instance_id)
            else:
                self.offline.discard(instance_id)
