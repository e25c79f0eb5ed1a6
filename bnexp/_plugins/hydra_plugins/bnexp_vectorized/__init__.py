"""bnexp's Hydra launcher plugin: ``hydra/launcher=vectorized`` (see vectorized_launcher.py)."""
