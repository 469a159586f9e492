"""The edge server's HTTP protocol from the caller's side, written once: the deploy flow, the tests and the
benchmarks use this client rather than hand-written requests.

Errors are `EdgeError`s with the HTTP status (None for network trouble) and whether trying again may help
(network trouble, 5xx other than "no model loaded"); a refusal (401, 409, 422, …) is never transient.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from transflow_edge.settings import TOKEN_ENV


class EdgeError(RuntimeError):
    def __init__(self, message: str, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.status, self.transient = status, transient


def error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return response.text[:300]


class EdgeClient:
    """One edge server at `base_url`; the admin token from the argument, else from `$TRANSFLOW_EDGE_TOKEN`."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "").strip() or None
        # Uploads of ~100 MB bundles to small boxes, which verify and load them before answering.
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, write=600.0, read=600.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        """One call; a status outside `ok` raises EdgeError (5xx transient, except 503 "no model")."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EdgeError(f"{method} {path} failed ({type(exc).__name__}: {exc})", None, True) from None
        if response.status_code not in ok:
            status = response.status_code
            raise EdgeError(
                f"{method} {path} answered {status}: {error_text(response)}", status, status >= 500 and status != 503
            )
        return response

    def _admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token or ''}"}

    # -- what it serves

    def model(self) -> dict[str, Any] | None:
        """`GET /v1/model`: the loaded bundle's description, or None when no model is loaded (503)."""
        response = self.request("GET", "/v1/model", ok=(200, 503))
        return None if response.status_code == 503 else response.json()

    def serving(self) -> str | None:
        """The sha256 of the bundle served now; None when no model is loaded."""
        info = self.model()
        return None if info is None else str(info["bundle_sha256"])

    def ready(self) -> bool:
        try:
            return self.request("GET", "/readyz", ok=(200, 503)).status_code == 200
        except EdgeError:
            return False

    def predict(self, inputs: list[Any]) -> dict[str, Any]:
        """`POST /v1/predict` with JSON inputs (text, or base64-encoded images)."""
        return self.request("POST", "/v1/predict", json={"inputs": inputs}).json()

    # -- admin

    def upload(self, archive: Path) -> dict[str, Any]:
        """Send a bundle .tar.gz; the server verifies, golden-checks and swaps it in before answering."""
        with archive.open("rb") as body:
            headers = {**self._admin(), "Content-Type": "application/gzip"}
            return self.request("POST", "/v1/admin/bundles", content=body, headers=headers).json()

    def rollback(self) -> dict[str, Any]:
        return self.request("POST", "/v1/admin/rollback", headers=self._admin()).json()

    # -- a candidate beside the live model (shadow or canary; see candidate.py)

    def upload_candidate(
        self, archive: Path, mode: str = "shadow", fraction: float | None = None, sticky: str | None = None
    ) -> dict[str, Any]:
        """Send a bundle .tar.gz as the candidate; verified and golden-checked like an upload, not swapped in."""
        params: dict[str, Any] = {"mode": mode}
        if fraction is not None:
            params["fraction"] = fraction
        if sticky:
            params["sticky"] = sticky
        with archive.open("rb") as body:
            headers = {**self._admin(), "Content-Type": "application/gzip"}
            return self.request("POST", "/v1/admin/candidate", params=params, content=body, headers=headers).json()

    def candidate(self) -> dict[str, Any] | None:
        """The candidate and its figures (`candidate` in `GET /v1/model`); None when there is none."""
        info = self.model()
        return None if info is None else info.get("candidate")

    def promote_candidate(self) -> dict[str, Any]:
        return self.request("POST", "/v1/admin/candidate/promote", headers=self._admin()).json()

    def drop_candidate(self) -> dict[str, Any]:
        return self.request("POST", "/v1/admin/candidate/drop", headers=self._admin()).json()
