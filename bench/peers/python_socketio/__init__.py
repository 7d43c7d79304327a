"""python-socketio with ``AsyncRedisManager``: see :mod:`.server`."""
