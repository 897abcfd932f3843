"""The format layer: open images (QED, raw), their backing chains, check and repair."""
