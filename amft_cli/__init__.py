"""amft-cli: Adaptive Meta Fine-Tuning (SFT + RL in one stage, learned balance μ) and its baselines."""

__version__ = "0.1.0"
