"""mirror-sampler: consistent, key-based, percentage request mirroring for Envoy."""

__version__ = "0.1.0"
