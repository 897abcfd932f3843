"""Long-running operations on images (convert; check, defrag, stream arrive here too)."""
