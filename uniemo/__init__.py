"""uniemo: distributed training of UniEmo (the method: docs/METHOD.md)."""

__version__ = "0.1.0"
