"""DVC as DVC does it: `.dvcignore`, a configured cache directory, and a worker that pulls the pinned data.

Real git + DVC repos in temp dirs, set up with the `dvc` command line; the checks run through tasks.data, which
reads the ignore rules, the cache directory and the remote from DVC's own API.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tasks.data import dvc_layout, ensure_data, read_pin, tree_entries, tree_md5, verify_data
from tests.conftest import DVC

pytestmark = pytest.mark.integration


def sh(repo: Path, *args: str) -> None:
    subprocess.run(list(args), cwd=repo, check=True, capture_output=True, timeout=120)


def make_repo(tmp: Path, *, dvcignore: str = "", cache_dir: Path | None = None, remote: Path | None = None) -> Path:
    repo = tmp / "repo"
    (repo / "data" / "train").mkdir(parents=True)
    for i in range(3):
        (repo / "data" / "train" / f"{i}.txt").write_text(f"example {i}\n")
    (repo / "data" / "labels.txt").write_text("a\nb\n")
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    if dvcignore:
        (repo / ".dvcignore").write_text(dvcignore)
    if cache_dir:
        sh(repo, DVC, "cache", "dir", str(cache_dir))
    if remote:
        sh(repo, DVC, "remote", "add", "-d", "store", str(remote))
    sh(repo, DVC, "add", "-q", "data")
    if remote:
        sh(repo, DVC, "push", "-q")
    return repo


def test_dvcignore_is_honoured_like_dvc_add(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, dvcignore="*.tmp\nscratch/\n")
    (repo / "data" / "notes.tmp").write_text("editor swap file")
    (repo / "data" / "scratch").mkdir()
    (repo / "data" / "scratch" / "x.txt").write_text("work in progress")
    report = verify_data(repo / "data.dvc")
    assert report.ok, report.problems
    # the same answer as DVC: the listing without ignored files hashes to the md5 `dvc add` wrote
    assert tree_md5(tree_entries(repo / "data", dvc_layout(repo))) == read_pin(repo / "data.dvc").md5
    (repo / "data" / "extra.txt").write_text("not ignored")
    assert [p.rsplit("/", 1)[-1] for p in verify_data(repo / "data.dvc").problems] == [
        "extra.txt: not in the pinned version"
    ]


def test_the_configured_cache_directory_is_where_objects_are_checked(tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    repo = make_repo(tmp_path, cache_dir=cache)
    assert not (repo / ".dvc" / "cache").exists() and dvc_layout(repo).cache == cache / "files" / "md5"
    (repo / "data" / "labels.txt").write_text("a\nc\n")
    report = verify_data(repo / "data.dvc")
    # named per file: the pinned listing was found in the configured cache (else only "md5 != pinned")
    assert [p.split("data/")[-1].split(" (")[0] for p in report.problems] == ["labels.txt: content changed"]
    (repo / "data" / "labels.txt").write_text("a\nb\n")
    victim = next(p for p in (cache / "files" / "md5").rglob("*") if p.is_file() and not p.name.endswith(".dir"))
    victim.chmod(0o644)
    victim.write_bytes(b"corrupt")
    report = verify_data(repo / "data.dvc")
    assert any(str(victim) in p and "corrupted" in p for p in report.problems), report.problems


def test_a_worker_without_the_data_pulls_it_and_never_overwrites_changes(tmp_path: Path) -> None:
    import shutil

    remote = tmp_path / "remote"
    repo = make_repo(tmp_path, remote=remote)
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")  # a fresh worker: the checkout, no data, no cache
    report = ensure_data(repo / "data.dvc")
    assert report.ok, report.problems
    assert (repo / "data" / "train" / "2.txt").read_text() == "example 2\n"
    (repo / "data" / "train" / "0.txt").write_text("my edit\n")
    (repo / "data" / "labels.txt").unlink()
    report = ensure_data(repo / "data.dvc")  # a change is not pulled over
    assert not report.ok and (repo / "data" / "train" / "0.txt").read_text() == "my edit\n"


def test_a_relative_dvc_file_verifies_like_an_absolute_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path, dvcignore="*.tmp\n")
    monkeypatch.chdir(repo)  # `transflow data verify` run from the project: data.dvc, data/ relative
    assert verify_data(Path("data.dvc")).ok


def test_without_a_remote_missing_data_is_reported_not_pulled(tmp_path: Path) -> None:
    import shutil

    repo = make_repo(tmp_path)
    shutil.rmtree(repo / "data")
    report = ensure_data(repo / "data.dvc")
    assert not report.ok and "directory missing" in report.problems[0]
