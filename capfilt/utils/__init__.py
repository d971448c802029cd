"""Small shared helpers: logging, progress, distributed set-up."""
