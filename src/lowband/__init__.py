"""lowband: train deep networks across many workers over slow links."""

__version__ = "0.1.0"
