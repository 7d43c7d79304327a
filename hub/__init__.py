"""hub: a real-time sync server for local-first apps.

Devices push changes; the hub merges them field by field (last writer wins by
hybrid logical clock), stores them in PostgreSQL and tells the user's other
devices at once. See PROTOCOL.md for the wire contract.
"""

__all__: list[str] = []
