"""uniemo: distributed training of UniEmo (see ../shared/design/METHOD.md)."""

__version__ = "0.1.0"
