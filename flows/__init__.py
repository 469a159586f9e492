"""Prefect flows, the CLI and the RunConfig: the edge of the program."""
