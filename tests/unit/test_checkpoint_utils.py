"""Local checkpoint folders: a save that fails or a deletion cut short never leaves a partial checkpoint."""
import errno
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from utils import files
from utils.checkpoints import folders, writer
from utils.checkpoints.folders import list_checkpoints, prune_checkpoints, remove_incomplete_saves
from utils.checkpoints.writer import save_checkpoint
from utils.errors import CheckpointError

NAMES = ["checkpoint-epoch0-step2-files0", "checkpoint-epoch0-step4-files0", "checkpoint-epoch0-step6-files1"]


def make_checkpoints(folder: Path) -> None:
    for name in NAMES:
        (folder / name).mkdir(parents=True)
        (folder / name / "model.safetensors").write_bytes(b"weights")


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    make_checkpoints(tmp_path)
    assert prune_checkpoints(tmp_path, 1, may_delete=lambda info: info.step != 2) == [NAMES[1]]
    assert [info.name for info in list_checkpoints(tmp_path)] == [NAMES[0], NAMES[2]]


def test_a_deletion_cut_short_leaves_no_partial_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_checkpoints(tmp_path)
    real_rmtree = shutil.rmtree

    def rmtree_killed_halfway(path: Path, *args: object, **kwargs: object) -> None:
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt  # a second Ctrl+C, or the process killed, mid-deletion

    monkeypatch.setattr(folders.shutil, "rmtree", rmtree_killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, 2)
    monkeypatch.setattr(folders.shutil, "rmtree", real_rmtree)
    # What is left under a checkpoint name is whole; the half-deleted one is a .tmp- folder, cleaned later.
    assert [info.name for info in list_checkpoints(tmp_path)] == NAMES[1:]
    assert remove_incomplete_saves(tmp_path) == [f".tmp-{NAMES[0]}"]


def test_a_save_that_runs_out_of_disk_is_one_error_line_and_no_checkpoint(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))  # something for save_state to write

    def disk_full(path: Path, value: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "write_json_atomic", disk_full)
    with pytest.raises(CheckpointError, match=r"saving checkpoint-epoch0-step2-files0 in .* No space left"):
        save_checkpoint(accelerator, tmp_path, NAMES[0], {"metadata.json": {"step": 2}})
    assert list_checkpoints(tmp_path) == []
    assert remove_incomplete_saves(tmp_path) == []  # the failed save removed its .tmp- folder itself


def test_torch_running_out_of_disk_is_one_error_line_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accelerator = Accelerator(cpu=True)

    def disk_full(output_dir: str) -> None:  # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 512")

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(CheckpointError, match=r"saving checkpoint-epoch0-step2-files0 in .* unexpected pos"):
        save_checkpoint(accelerator, tmp_path, NAMES[0], {"metadata.json": {"step": 2}})
    assert list_checkpoints(tmp_path) == []
    # torch never says why: the free space does.
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 0))
    with pytest.raises(CheckpointError, match=r"in .* failed: no space left on device \(0 MB free\): \[enforce fail"):
        save_checkpoint(accelerator, tmp_path, NAMES[0], {"metadata.json": {"step": 2}})


def test_a_json_file_that_cannot_be_written_is_left_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "uploads.json"
    files.write_json_atomic(path, {"version": 1})

    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=f"^{path}: cannot write \\(No space left on device\\)$"):
        files.write_json_atomic(path, {"version": 2})
    assert path.read_text() == '{\n  "version": 1\n}' and not path.with_name("uploads.json.tmp").exists()


def test_leftovers_of_a_download_cut_short_are_removed(tmp_path: Path) -> None:
    make_checkpoints(tmp_path)
    (tmp_path / f".tmp-{NAMES[2]}.tar.zst").write_bytes(b"half an archive")
    assert remove_incomplete_saves(tmp_path) == [f".tmp-{NAMES[2]}.tar.zst"]
    assert [info.name for info in list_checkpoints(tmp_path)] == NAMES
