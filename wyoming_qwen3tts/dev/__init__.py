"""Developer tools (random-weight checkpoints)."""
