"""Small files diffrl ships: tiny tokenizers, toy checkpoints, prompt lists (read via importlib.resources)."""
