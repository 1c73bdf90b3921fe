"""Top-level test configuration.

Its presence puts ``tests/`` on ``sys.path`` (pytest's default "prepend" import mode), so every
suite can import the shared helpers in ``tests/support`` (``from support.redis_server import
RedisServer``), whichever folder pytest was pointed at.
"""
