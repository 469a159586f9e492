"""Transflow's light edge server: bundle format, preprocessing, the server and its client (no torch)."""

__version__ = "0.1.0"
