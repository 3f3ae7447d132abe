"""converse API service: FastAPI app, validation, Triton client and audio stitching."""
