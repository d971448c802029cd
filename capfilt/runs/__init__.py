"""Run folders, checkpoints' home, and the one answer to "what model is at this path"."""
