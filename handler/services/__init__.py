"""Request services: plan turns, call models through Triton, stitch and encode."""
