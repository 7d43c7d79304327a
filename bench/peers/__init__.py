"""Peers the hub's fan-out benchmarks compare against: other real-time servers
with the same semantics on the same topology (a user's devices in one room,
a ``push`` from one device emitted unchanged to the others), that persist
nothing.

- :mod:`bench.peers.python_socketio`: python-socketio's ``AsyncServer`` with
  ``AsyncRedisManager``, under uvicorn with the hub's server stack.
- ``bench/peers/node``: Socket.IO on Node.js with ``@socket.io/redis-adapter``
  (``scripts/bench`` installs it with ``npm ci``).
"""
