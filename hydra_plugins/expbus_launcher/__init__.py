"""expbus's Hydra launcher plugin: ``hydra/launcher=expbus`` (or NeMo's name, ``nemo_launcher``)."""
