"""The clearml sink (being written)."""
