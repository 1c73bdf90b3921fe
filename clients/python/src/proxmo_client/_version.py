"""The client package version (kept equal to clients/python/pyproject.toml)."""

__version__ = "0.1.0"
