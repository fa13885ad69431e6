"""diffrl: reward fine-tuning and inference-time steering for diffusion and flow-matching generators."""

__version__ = "0.1.0"
