"""``tta_cli.ownership``: a run deletes only what it recorded writing, never through a link, and
holds its folder alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from tta_cli.errors import TTAError
from tta_cli.ownership import (
    LOCK_FILE,
    OWNED_FILE,
    FolderLock,
    owned,
    plan_overwrite,
    record,
    remove_planned,
    stale_temporaries,
    start_manifest,
)


def _run_folder(folder: Path) -> Path:
    folder.mkdir()
    start_manifest(folder)
    record(folder, "predictions.csv", "model")
    (folder / "predictions.csv").write_text("rows")
    (folder / "model").mkdir()
    return folder


def test_only_listed_names_and_their_temporary_names_are_removed(tmp_path: Path) -> None:
    out = _run_folder(tmp_path / "out")
    for name in ("thesis.tmp-final.docx", "notes.tmp-1", "model.tmp-123", ".predictions.csv.tmp-9", "model.old-7"):
        (out / name).write_text("x")
    planned = plan_overwrite(out, overwrite=True, writes=("predictions.csv", "run.json"))
    assert sorted(p.name for p in planned) == [".predictions.csv.tmp-9", "model", "model.old-7", "model.tmp-123",
                                               "predictions.csv"]
    remove_planned(out, planned)
    assert sorted(p.name for p in out.iterdir()) == [OWNED_FILE, "notes.tmp-1", "thesis.tmp-final.docx"]
    assert owned(out) == set()


def test_an_unlisted_output_name_refuses_before_anything_is_removed(tmp_path: Path) -> None:
    out = _run_folder(tmp_path / "out")
    (out / "run.json").write_text("a user's")
    with pytest.raises(TTAError, match=r"run\.json, which no tta run recorded"):
        plan_overwrite(out, overwrite=True, writes=("predictions.csv", "run.json"))
    assert (out / "predictions.csv").exists() and (out / "run.json").exists()


def test_a_listed_link_is_removed_not_followed(tmp_path: Path) -> None:
    out = _run_folder(tmp_path / "out")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    (out / "model").rmdir()
    (out / "model").symlink_to(target)
    remove_planned(out, plan_overwrite(out, overwrite=True))
    assert (target / "precious").read_text() == "keep" and not (out / "model").is_symlink()


def test_without_a_manifest_nothing_is_proven(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("an older tool's")
    (out / OWNED_FILE).symlink_to(tmp_path / "nowhere.json")  # a link is no proof either
    assert plan_overwrite(out, overwrite=True) == []
    with pytest.raises(TTAError, match="not empty"):
        plan_overwrite(out, overwrite=False)


def test_a_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(TTAError, match="symbolic link"):
        plan_overwrite(tmp_path / "link", overwrite=False)
    with pytest.raises(TTAError, match="symbolic link"):
        FolderLock(tmp_path / "link").acquire()


def test_the_lock_is_exclusive_and_leaves_no_trace(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with FolderLock(out):
        assert (out / LOCK_FILE).is_file()
        with pytest.raises(TTAError, match="in use by another tta run"):
            FolderLock(out).acquire()
    assert not out.exists()  # created by the lock, nothing written: removed again
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with FolderLock(out):
        pass
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with FolderLock(out):  # free again
        pass


def test_stale_temporaries_are_those_of_listed_names(tmp_path: Path) -> None:
    out = _run_folder(tmp_path / "out")
    for name in (".checkpoint.pt.tmp-5", "model.tmp-5", "x.tmp-5"):
        (out / name).write_text("")
    record(out, "checkpoint.pt")
    assert sorted(p.name for p in stale_temporaries(out)) == [".checkpoint.pt.tmp-5", "model.tmp-5"]
