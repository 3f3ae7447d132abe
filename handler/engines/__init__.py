"""One adapter per model family, and the catalogue built from what Triton serves."""
