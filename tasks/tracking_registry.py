"""The registry calls of `Tracker` that the promotion lock (tasks/registry_lock.py) and the promotion's intent
tags (tasks/promotion_commit.py) are built from: atomic create-if-absent, tickets numbered by the server, renewals
stamped by the server's clock, tags and deletions that treat "already gone" as done. With tasks/tracking.py, the
only module that imports MLflow.
"""

from __future__ import annotations

import time
from typing import Any


def missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def quote(name: str) -> str:
    return name.replace("'", "\\'")


class RegistryCalls:
    """Mixed into `Tracker`, which provides `client` (an MlflowClient on the tracking URI)."""

    client: Any

    def create_unique(self, name: str, tags: dict[str, str]) -> bool:
        """Create a registered model named `name` unless one exists: the server's unique-name constraint makes
        this the atomic create-if-absent a cross-process lock needs. False when it already exists."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags=tags, description="transflow lock; safe to delete")
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(exc).lower():
                return False
            raise
        return True

    def model_tags(self, name: str) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(name).tags)
        except MlflowException as exc:
            if missing(exc):
                return None
            raise

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self.client.set_registered_model_tag(name, key, value)

    def delete_model_tag(self, name: str, key: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model_tag(name, key)
        except MlflowException as exc:
            if not missing(exc):
                raise

    def create_ticket(self, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
        """A new version of the lock model: the server numbers versions atomically and never reuses a number."""
        return str(self.client.create_model_version(name, source, run_id, tags, await_creation_for=0).version)

    def tickets(self, name: str) -> list[tuple[int, int, dict[str, str]]]:
        """The live versions of a lock model: (number, the server's last-updated stamp in ms, tags)."""
        found = self.client.search_model_versions(f"name='{quote(name)}'")
        return sorted((int(v.version), int(v.last_updated_timestamp or 0), dict(v.tags)) for v in found)

    def touch_version(self, name: str, version: str) -> bool:
        """Renew a ticket (the server stamps its last-updated time with its own clock); False when it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_model_version(name, version, description=f"renewed {time.monotonic_ns()}")
        except MlflowException as exc:
            if missing(exc):
                return False
            raise
        return True

    def delete_version(self, name: str, version: str) -> None:
        """Delete a model version; one that is already gone is fine."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_model_version(name, version)
        except MlflowException as exc:
            if not missing(exc):
                raise

    def delete_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(name)
        except MlflowException as exc:
            if not missing(exc):
                raise
