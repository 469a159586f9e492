"""The bundle: the one contract between the exporter (writes) and the edge server (reads, verifies).

A bundle is a directory, or the same directory as a `.tar.gz`:

    manifest.json        format, name, version, modality, default model file, input/output spec,
                         lineage, metrics, library versions, and sha256 + size of every other file
    model.onnx           fp32, dynamic batch (and sequence for text) axes
    model.int8.onnx      int8, only when it passed the accuracy budget
    preprocessing.json   text: max_length, padding, truncation; image: size, resize, mean, std, channels
    tokenizer.json       text only: the fast tokenizer (Rust `tokenizers`, no Python code)
    labels.json          class names, index = logit position
    golden.json          a few real inputs with expected labels and logits (the smoke test)
    README.md            model card

The bundle's identity is the sha256 of `manifest.json`: it pins every file through their hashes.
Nothing here imports torch, and nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "transflow-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_BUNDLE_BYTES = 2 << 30  # 2 GiB unpacked
MAX_BUNDLE_FILES = 64
MAX_MANIFEST_BYTES = 1 << 20
MAX_RATIO, RATIO_FREE_BYTES = 100, 16 << 20  # unpacked/packed size, checked past the first 16 MiB
MAX_HEADER_BYTES = 64 << 10  # a pax or GNU long-name header: names and a few keys, never more


class BundleError(ValueError):
    """A bundle that must not be loaded; the message names the offending file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or name.startswith("~") or "\\" in name:
        raise BundleError(f"{name}: path escapes the bundle directory")
    return rel


def write_manifest(bundle_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `bundle_dir` and write manifest.json (meta + format + files)."""
    files = {}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(bundle_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "files": files}
    if manifest.get("default_model") not in files:
        raise BundleError(f"default_model {manifest.get('default_model')!r} is not a file of the bundle")
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory."""

    root: Path
    manifest: dict[str, Any]
    sha256: str

    def path(self, name: str) -> Path:
        return self.root / _safe_relpath(name)

    def json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text())

    @property
    def default_model(self) -> Path:
        return self.path(self.manifest["default_model"])


def check_manifest(manifest: Any) -> None:
    """The manifest's shape, before anything trusts it: a BundleError naming the first malformed field."""

    def bad(field: str, what: str) -> BundleError:
        return BundleError(f"{MANIFEST}: {field} {what}")

    if not isinstance(manifest, dict):
        raise bad("the top level", "must be a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise bad("format/format_version", f"must be {FORMAT!r} / {FORMAT_VERSION}")
    for key in ("name", "version"):
        value = manifest.get(key, "")
        if isinstance(value, bool) or not isinstance(value, str | int) or len(str(value)) > 200:
            raise bad(key, "must be a string (at most 200 characters)")
    if manifest.get("modality") not in ("text", "image"):
        raise bad("modality", "must be 'text' or 'image'")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("files", "must be a non-empty object of file name → {sha256, size}")
    if len(files) > MAX_BUNDLE_FILES:
        raise bad("files", f"lists more than {MAX_BUNDLE_FILES} files")
    for name, entry in files.items():
        where = f"files[{name[:80]!r}]"
        if not isinstance(entry, dict):
            raise bad(where, "must be an object {sha256, size}")
        digest, size = entry.get("sha256"), entry.get("size")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            raise bad(f"{where}.sha256", "must be 64 lowercase hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"{where}.size", "must be a non-negative integer")
    if not isinstance(manifest.get("default_model"), str) or manifest["default_model"] not in files:
        raise bad("default_model", f"{manifest.get('default_model')!r:.80} is not a listed file")
    for key in ("inputs", "outputs"):
        value = manifest.get(key, [])
        if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
            raise bad(key, "must be a list of objects")
    for key in ("lineage", "metrics", "versions"):
        if not isinstance(manifest.get(key, {}), dict):
            raise bad(key, "must be an object")


def verify_bundle(bundle_dir: Path) -> Bundle:
    """Check the manifest against the directory: every listed file present with its hash and size,
    no extra files, no links, no path outside the bundle. Raises BundleError naming the file."""
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise BundleError(f"{manifest_path}: missing")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST}: larger than {MAX_MANIFEST_BYTES} bytes")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    check_manifest(manifest)
    listed = manifest["files"]
    for name, entry in listed.items():
        path = bundle_dir / _safe_relpath(name)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise BundleError(f"{name}: not a regular file")
        if not path.is_file():
            raise BundleError(f"{name}: missing from the bundle")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{name}: sha256 does not match the manifest (changed or truncated)")
    for path in bundle_dir.rglob("*"):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_symlink():
            raise BundleError(f"{rel}: links are not allowed in a bundle")
        if path.is_file() and rel != MANIFEST and rel not in listed:
            raise BundleError(f"{rel}: extra file not in the manifest")
    return Bundle(bundle_dir, manifest, hashlib.sha256(raw).hexdigest())


def pack(bundle_dir: Path, out: Path) -> Path:
    """A reproducible .tar.gz of the bundle: sorted names, zero mtimes and owners."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(path.relative_to(bundle_dir).as_posix())
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tmp.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(buf.getvalue())
    except OSError as exc:  # disk full: no archive under the final name, no leftover
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"could not write bundle archive {out.name}: {exc.strerror}") from exc
    tmp.replace(out)
    return out


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long-name or pax header's whole payload into memory before any check of ours:
    refuse one over MAX_HEADER_BYTES first, and sparse files outright (a bundle has none)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        special = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, b"X")
        if self.type in special and self.size > MAX_HEADER_BYTES:
            raise BundleError(f"{self.name[:80]}: tar extended header of {self.size} bytes (limit {MAX_HEADER_BYTES})")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BundleError(f"{self.name[:80]}: sparse files are not allowed in a bundle")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def safe_extract(
    archive: Path, dest: Path, max_bytes: int = MAX_BUNDLE_BYTES, max_files: int = MAX_BUNDLE_FILES
) -> Path:
    """Extract a bundle archive into an empty `dest`, streaming: each member's header is checked (name, type,
    count, size, running total) before its data is read, so a hostile archive (200k members, a huge extended
    header, a member that unpacks to gigabytes) is refused after reading little of it, in bounded memory.
    Regular files only, no path outside `dest`; tarfile's 'data' filter as a second guard."""
    ratio_cap = max(RATIO_FREE_BYTES, MAX_RATIO * archive.stat().st_size)
    try:
        with tarfile.open(archive, mode="r|gz", tarinfo=_BoundedTarInfo) as tar:
            dest.mkdir(parents=True, exist_ok=False)
            total = 0
            for count, member in enumerate(tar, start=1):
                if count > max_files:
                    raise BundleError(f"{archive.name}: more than {max_files} entries")
                _safe_relpath(member.name)
                if not (member.isfile() or member.isdir()):
                    raise BundleError(f"{member.name}: only regular files are allowed (link or device)")
                total += member.size
                if total > max_bytes:
                    raise BundleError(f"{archive.name}: unpacks to more than {max_bytes} bytes")
                if total > ratio_cap:  # weights barely compress; a thousandfold ratio is a bomb
                    raise BundleError(f"{archive.name}: unpacks to over {MAX_RATIO}x its size (a compression bomb)")
                tar.extract(member, dest, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise BundleError(f"{archive.name}: not a readable tar.gz ({exc})") from None
    return dest


def read_bundle(source: Path, workdir: Path) -> Bundle:
    """Verify a bundle directory, or safely extract and verify a .tar.gz into `workdir`."""
    if source.is_dir():
        return verify_bundle(source)
    return verify_bundle(safe_extract(source, workdir))
