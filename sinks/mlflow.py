"""The mlflow sink (being written)."""
