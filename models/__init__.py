"""The math both sides share: base encoders, the base-embedding cache, windows, adapters, checkpoints."""
