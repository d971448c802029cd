"""capfilt: bootstrap image-text training data (BLIP CapFilt) on webdataset shards."""

__version__ = "0.1.0"
