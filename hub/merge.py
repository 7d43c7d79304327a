"""The reference merge: field-level last-writer-wins by HLC stamp, with deletes.

This module is the definition the rest follows: the store applies these
functions to decide what a batch changes, the Python client applies them to
its replica, and a property test holds the stored state to them.

The rules (PROTOCOL.md, "Changes and merge rules"):

- A field write replaces the stored field only when its stamp is greater
  than the stored field's stamp *and* than the record's delete stamp. Equal or
  smaller: dropped, silently.
- A delete raises the record's delete stamp when its stamp is greater.
  Every field stamped at or before the delete stamp is gone from the record's
  state (its row may stay, unseen). A write stamped exactly at a delete
  stamp loses to the delete; devices never write both with one stamp.
- A record is deleted when it has a delete stamp and no field stamped after
  it; an upsert stamped later revives it with only the newer fields.

Field state is a last-writer-wins register and the delete stamp a
max-register, so merging commutes, associates and is idempotent: replicas
that applied the same changes in any order hold the same state.
Pure: no I/O. Values are opaque (JSON text, or whatever the caller keeps).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .types import Change, Delta

__all__ = ["FieldState", "RecordState", "Replica", "apply_delete", "apply_upsert"]


@dataclass(slots=True)
class FieldState:
    value: Any
    hlc: str


@dataclass(slots=True)
class RecordState:
    """One record: its fields (visible or not) and its delete stamp."""

    fields: dict[str, FieldState] = field(default_factory=dict)
    deleted_hlc: str | None = None

    def visible(self) -> dict[str, FieldState]:
        """The fields that are part of the record's state: stamped after the delete."""
        if self.deleted_hlc is None:
            return dict(self.fields)
        cut = self.deleted_hlc
        return {name: f for name, f in self.fields.items() if f.hlc > cut}

    @property
    def deleted(self) -> bool:
        if self.deleted_hlc is None:
            return False
        cut = self.deleted_hlc
        return not any(f.hlc > cut for f in self.fields.values())


def apply_upsert(record: RecordState, writes: Iterable[tuple[str, Any, str]]) -> list[str]:
    """Apply field writes ``(name, value, stamp)``; return the names that changed."""
    changed: list[str] = []
    cut = record.deleted_hlc
    for name, value, hlc in writes:
        if cut is not None and hlc <= cut:
            continue
        current = record.fields.get(name)
        if current is not None and hlc <= current.hlc:
            continue
        record.fields[name] = FieldState(value, hlc)
        changed.append(name)
    return changed


def apply_delete(record: RecordState, hlc: str) -> bool:
    """Raise the delete stamp; True when it changed."""
    if record.deleted_hlc is not None and hlc <= record.deleted_hlc:
        return False
    record.deleted_hlc = hlc
    return True


def apply_change(record: RecordState, change: Change) -> bool:
    """Apply one pushed change; True when it altered the record's stored state."""
    if change.op == "delete":
        assert change.hlc is not None
        return apply_delete(record, change.hlc)
    return bool(apply_upsert(record, ((f.name, f.value, f.hlc) for f in change.fields)))


Key = tuple[str, str]  # (collection, record id)


class Replica:
    """A whole data set under the reference merge: what a device or the hub holds."""

    def __init__(self) -> None:
        self.records: dict[Key, RecordState] = {}

    def record(self, collection: str, record_id: str) -> RecordState:
        key = (collection, record_id)
        found = self.records.get(key)
        if found is None:
            found = self.records[key] = RecordState()
        return found

    def apply_change(self, change: Change) -> bool:
        return apply_change(self.record(change.collection, change.record_id), change)

    def apply_delta(self, delta: Delta) -> None:
        """Apply a record delta from a pull or an event (idempotent, any order)."""
        record = self.record(delta.collection, delta.record_id)
        if delta.deleted_hlc is not None:
            apply_delete(record, delta.deleted_hlc)
        apply_upsert(record, ((n, v, h) for n, (v, h) in delta.fields.items()))

    def state(self) -> dict[Key, tuple[dict[str, tuple[Any, str]], str | None]]:
        """The comparable state: visible fields and the delete stamp of each record."""
        return {
            key: ({n: (f.value, f.hlc) for n, f in rec.visible().items()}, rec.deleted_hlc)
            for key, rec in self.records.items()
        }
