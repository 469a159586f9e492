"""The edge side: bundle format and the light inference server (no torch)."""
