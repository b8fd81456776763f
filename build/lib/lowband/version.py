"""lowband's version (one place: the package, the CLI's --version and run.json read it)."""

__version__ = "0.1.0"
