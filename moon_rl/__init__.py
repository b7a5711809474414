"""moon-rl: reasoning-aware product representation learning on TRL."""

__version__ = "0.1.0"
