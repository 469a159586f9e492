"""Prefect flows and the CLI: the edge of the program. Importing this package changes nothing."""
