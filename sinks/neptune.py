"""The neptune sink (being written)."""
