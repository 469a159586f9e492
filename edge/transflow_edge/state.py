"""The server's state: the loaded model (one reference, swapped whole), the store, the batcher, the watcher."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from transflow_edge.batcher import MicroBatcher
from transflow_edge.bundle import Bundle, BundleError, safe_extract, verify_bundle
from transflow_edge.candidate import CandidateSlot
from transflow_edge.candidate_metrics import CandidateCollector
from transflow_edge.metrics import Metrics
from transflow_edge.model import LoadedModel, load_model
from transflow_edge.settings import Settings
from transflow_edge.store import BundleStore
from transflow_edge.watcher import DirectoryWatcher

log = logging.getLogger("transflow.edge")


class EdgeState:
    """The loaded model (one reference, swapped whole), the state directory and the batcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.watcher: DirectoryWatcher | None = None
        if settings.watch_dir is not None:  # first: a missing folder must fail before the state dir is locked
            self.watcher = DirectoryWatcher(
                settings.watch_dir, settings.watch_interval_s, self.install, lambda: self.rollback("watch")
            )
        self._temp_root: Path | None = None
        root = settings.state_dir
        if root is None:
            root = self._temp_root = Path(tempfile.mkdtemp(prefix="transflow-edge-"))
            log.warning("no --state-dir: uploaded bundles live in %s and are lost at exit", root)
        self.store = BundleStore(root)
        self.metrics = Metrics()
        self.batcher = MicroBatcher(
            settings.max_batch, settings.max_wait_ms, settings.max_queue, self.metrics.observe_batch
        )
        self.model: LoadedModel | None = None
        self.error: str | None = "no bundle loaded yet"
        self._admin = threading.Lock()  # the swap and the state file: held for milliseconds
        self._checking = threading.Lock()  # one bundle verified and loaded at a time; rollbacks do not wait for it
        self.candidates = CandidateSlot(self)  # a candidate beside the live model: shadow or canary
        self.metrics.registry.register(CandidateCollector(self.candidates))

    # -- start and stop

    def start(self) -> None:
        """Install --bundle if given (errors are fatal), else load what `current` points to (errors: not ready)."""
        if self.settings.bundle is not None:
            self.install(self.settings.bundle, "startup")
        else:
            try:
                current = self.store.read_state()["current"]
                if current is not None:
                    self._switch(self._load_stored(current), source="startup", move_pointers=False)
            except BundleError as exc:
                self.error = f"current bundle failed verification: {exc}"
                self.metrics.observe_load("startup", "rejected")
                log.error("%s; not ready until a bundle is uploaded or rolled back to", self.error)
        self.candidates.restore()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.batcher.stop()
        self.candidates.close()
        self.store.close()
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)

    # -- loading and swapping

    def _pointer(self, name: str) -> str | None:
        try:
            return self.store.read_state()[name]
        except BundleError as exc:
            log.error("%s", exc)
            return None

    def _load(self, bundle: Bundle) -> LoadedModel:
        s = self.settings
        return load_model(bundle, s.intra_op_threads, s.max_image_pixels, s.image_formats)

    def _load_stored(self, sha256: str) -> LoadedModel:
        return self._load(self.store.load(sha256))

    def _switch(self, model: LoadedModel, source: str, move_pointers: bool = True) -> None:
        """Persist the state first, in one write (a crash leaves the old state or the new one), then swap the
        one reference. Call with `_admin` held."""
        new = model.bundle.sha256
        previous = self._pointer("previous")
        if move_pointers:
            old = self._pointer("current")
            previous = old if old is not None and old != new else previous
            self.store.write_state(new, previous)
        self.model = model  # the atomic swap: requests already prepared keep their reference to the old model
        self.error = None
        self.metrics.observe_load(source, "loaded")
        self.store.prune({new, previous})
        log.info("serving %s version %s (bundle %s, from %s)", model.name, model.version, new[:12], source)

    def _stage(self, source: Path, staged: Path) -> Bundle:
        """A verified copy under the state dir: archives are safely extracted, directories copied file by file."""
        if not source.is_dir():
            return verify_bundle(safe_extract(source, staged, max_bytes=self.settings.max_bundle_bytes))
        original = verify_bundle(source)
        staged.mkdir()
        for name in [*original.manifest["files"], "manifest.json"]:
            target = staged / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original.path(name), target)
        return verify_bundle(staged)  # verify what we keep, not what we read first

    def install(self, source: Path, kind: str = "upload", work: Path | None = None) -> dict[str, Any]:
        """Stage, verify, load and golden-check a bundle; swap it in only when every step passed."""
        own_work = work is None
        work = work if work is not None else self.store.new_staging()
        try:
            with self._checking:  # the slow part, outside `_admin`: a rollback meanwhile is not held up
                bundle = self._stage(source, work / "bundle")
                current = self.model
                if current is not None and current.bundle.sha256 == bundle.sha256:
                    return self.describe_change("unchanged", current)
                model = self._load(bundle)
                with self._admin:
                    final = self.store.adopt(bundle.root, bundle.sha256)
                    model = replace(model, bundle=replace(bundle, root=final))
                    self._switch(model, kind)
                return self.describe_change("loaded", model)
        except BundleError:
            self.metrics.observe_load(kind, "rejected")
            raise
        finally:
            if own_work:
                shutil.rmtree(work, ignore_errors=True)

    def rollback(self, source: str = "rollback") -> dict[str, Any]:
        """Serve the previous bundle again (verified and golden-checked again); rolling back twice rolls forward."""
        with self._admin:
            previous = self._pointer("previous")
            if previous is None or not (self.store.bundles / previous).is_dir():
                raise LookupError("no previous bundle to roll back to")
            try:
                model = self._load_stored(previous)
            except BundleError:
                self.metrics.observe_load(source, "rejected")
                raise
            self._switch(model, source)
            return self.describe_change("rolled_back", model)

    def describe_change(self, status: str, model: LoadedModel) -> dict[str, Any]:
        return {
            "status": status,
            "name": model.name,
            "version": model.version,
            "bundle_sha256": model.bundle.sha256,
            "golden": model.golden,
            "previous_bundle_sha256": self._pointer("previous"),
        }

    def describe(self, model: LoadedModel) -> dict[str, Any]:
        manifest = model.bundle.manifest
        lineage = manifest.get("lineage") or {}
        return {
            "name": model.name,
            "version": model.version,
            "modality": model.modality,
            "data_version": lineage.get("data_version"),
            "bundle_sha256": model.bundle.sha256,
            "loaded_at": model.loaded_at,
            "default_model": manifest.get("default_model"),
            "labels": model.labels,
            "inputs": manifest.get("inputs"),
            "outputs": manifest.get("outputs"),
            "lineage": lineage,
            "metrics": manifest.get("metrics") or {},
            "golden": model.golden,
            "previous_bundle_sha256": self._pointer("previous"),
            "candidate": self.candidates.describe(),
        }
