"""The tensorboard sink (being written)."""
