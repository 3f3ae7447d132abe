"""Turn bundled packages and checkpoints into Triton model repository entries."""
