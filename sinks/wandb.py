"""The wandb sink (being written)."""
