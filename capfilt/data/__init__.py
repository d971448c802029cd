"""Shards: reading, writing, specs, loaders (docs/architecture.md, layer 3)."""

from capfilt.data import remote

# before any shard is opened, in every process that reads shards (loader workers included)
remote.install()
