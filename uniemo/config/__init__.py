"""Config: one typed schema (``schema``), YAML + overrides (``loader``)."""

from uniemo.config.loader import dump_config, load_config, save_resolved, valid_keys, with_overrides
from uniemo.config.schema import EMOTIONS, NUM_EMOTIONS, Config

__all__ = ["Config", "EMOTIONS", "NUM_EMOTIONS", "dump_config", "load_config", "save_resolved", "valid_keys", "with_overrides"]
