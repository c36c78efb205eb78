"""Data tools: readers, the synthetic emotion set, shards, attribute table, the streaming loader."""
