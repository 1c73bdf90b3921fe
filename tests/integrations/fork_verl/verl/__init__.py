"""Stand-in for a verl-agent fork's vendored verl 0.3 (tests only): no estimator registry and no
``verl.plugins`` entry-point loading, exactly like the ProxMO authors' trainer."""

from verl.protocol import DataProto

__version__ = "0.3.1.dev"
__all__ = ["DataProto", "__version__"]
