"""bnexp: a command-line experiment runner for batch-normalization science."""

__version__ = "0.1.0"
