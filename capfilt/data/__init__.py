"""Shards: reading, writing, specs, loaders (docs/architecture.md, layer 3)."""
