"""The Checkpointer in process, with a small fake Accelerator: what a save writes, retention, the upload
hand-off, the resume choice and its refusals, and the train state it restores. (Exact resume, signals and
several processes are end-to-end tests: test_train_e2e.py, test_multiprocess.py.)"""
import errno
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import SPEC, WEIGHTS, FakeAccelerator, make_checkpointer, make_config, state_at

from configs.training_config import ConfigError
from conftest import MICRO_MODEL
from utils.checkpoint_utils import Checkpointer
from utils.checkpoints import resume
from utils.checkpoints.folders import list_checkpoints
from utils.checkpoints.resume import schedule_changes
from utils.checkpoints.writer import write_rng_state
from utils.errors import CheckpointError, DataError, UploadError
from utils.model import build_model
from utils.storage.base import ObjectInfo
from utils.train_state import TrainingMetrics, TrainState
from utils.training_utils import make_optimizer
from utils.uploads.destination import open_destination
from utils.uploads.manifest import UploadManifest


def names(folder: str) -> list[str]:
    return [info.name for info in list_checkpoints(folder)]


def test_a_save_writes_a_whole_named_folder_and_keeps_the_newest(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    checkpointer = make_checkpointer(config)
    for step in (4, 8, 12):
        checkpointer.save(state_at(step, shard_cursor=1), "scheduled")
    assert names(config.checkpoint_dir) == ["checkpoint-epoch0-step8-files1", "checkpoint-epoch0-step12-files1"]
    final = Path(config.checkpoint_dir) / "checkpoint-epoch0-step12-files1"
    assert {p.name for p in final.iterdir()} == {WEIGHTS, "random_states_0.pkl", "tokenizer.json", "metadata.json",
                                                  "training_config.json", "training_metrics.json", "data_state.json",
                                                  "checksums.json", "config.json", "generation_config.json"}
    # (this test's tokenizer.json is not a real tokenizer: no tokenizer_config.json; no model: no optimizer groups)
    metadata = json.loads((final / "metadata.json").read_text())
    assert metadata["step"] == 12 and metadata["training_progress"]["files_processed"] == 1
    assert metadata["training_progress"]["tokens_seen"] == 12 * 128
    assert json.loads((final / "training_config.json").read_text())["model_shape"]["hidden_size"] == 128
    assert json.loads((final / "data_state.json").read_text())["position"]["sample_cursor"] == 3
    assert (final / "tokenizer.json").read_text() == '{"a tokenizer": true}'
    assert checkpointer.last_saved_step == 12
    assert not [p for p in Path(config.checkpoint_dir).iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(CheckpointError, match="already exists"):
        checkpointer.save(state_at(12, shard_cursor=1), "scheduled")  # a name is never overwritten


def test_without_uploads_a_checkpoint_an_earlier_run_left_unuploaded_is_kept(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_checkpoints=1)
    checkpointer = make_checkpointer(config)
    checkpointer.save(state_at(4), "scheduled")
    UploadManifest(config.checkpoint_dir, "gs://elsewhere").update("checkpoint-epoch0-step4-files0", state="failed")
    checkpointer.save(state_at(8), "scheduled")
    checkpointer.save(state_at(12), "scheduled")
    assert names(config.checkpoint_dir) == ["checkpoint-epoch0-step4-files0", "checkpoint-epoch0-step12-files0"]


def test_saves_are_handed_to_the_uploader_and_only_verified_ones_are_pruned(tmp_path: Path) -> None:
    config = make_config(tmp_path, upload_destination=str(tmp_path / "uploads"), background_upload=False,
                         keep_checkpoints=1, archive_format="tar")
    checkpointer = make_checkpointer(config)
    checkpointer.save(state_at(4), "scheduled")
    remote = tmp_path / "uploads"
    (remote / "checkpoint-epoch0-step8-files0.tar").write_bytes(b"another run's archive")  # a conflict
    checkpointer.save(state_at(8), "scheduled")
    checkpointer.save(state_at(12), "scheduled")
    records = UploadManifest(config.checkpoint_dir, "").read()
    assert {name: record.state for name, record in records.items()} == {
        "checkpoint-epoch0-step4-files0": "uploaded", "checkpoint-epoch0-step8-files0": "failed",
        "checkpoint-epoch0-step12-files0": "uploaded"}
    # step 4 was verified: pruned; step 8 failed (never overwritten remotely): kept, whatever keep_checkpoints says
    assert names(config.checkpoint_dir) == ["checkpoint-epoch0-step8-files0", "checkpoint-epoch0-step12-files0"]
    assert checkpointer.finish(interrupted=lambda: False) == ["checkpoint-epoch0-step8-files0"]


def test_should_save_at_the_cadence_the_last_step_and_a_stop(tmp_path: Path) -> None:
    checkpointer = make_checkpointer(make_config(tmp_path, save_steps=4, max_steps=10))
    assert [step for step in range(1, 11) if checkpointer.should_save(step, stopping=False)] == [4, 8, 10]
    assert checkpointer.should_save(3, stopping=True)


def test_a_timed_save_is_asked_for_once_until_it_is_made(tmp_path: Path) -> None:
    checkpointer = make_checkpointer(make_config(tmp_path, save_every_minutes=1.0))
    assert not checkpointer.time_due()
    checkpointer.last_save_started -= 61  # a minute and a second later
    # With several processes the vote is read a step late: a second True would ask for a second save.
    assert [checkpointer.time_due() for _ in range(3)] == [True, False, False]
    checkpointer.save(state_at(4), "scheduled")
    assert not checkpointer.time_due()
    checkpointer.last_save_started -= 61
    assert checkpointer.time_due()


def test_resume_choice_refuses_what_would_lose_or_overwrite_checkpoints(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    checkpointer = make_checkpointer(config)
    assert checkpointer.find_resume(None) is None  # empty folders: a fresh start
    for step in (4, 8):
        checkpointer.save(state_at(step), "scheduled")
    with pytest.raises(CheckpointError, match="already holds checkpoints .*--resume latest"):
        checkpointer.find_resume(None)
    with pytest.raises(CheckpointError, match="would overwrite newer checkpoints"):
        checkpointer.find_resume("checkpoint-epoch0-step4-files0")
    with pytest.raises(CheckpointError, match="not found .*existing: checkpoint-epoch0-step4-files0, "):
        checkpointer.find_resume("checkpoint-epoch0-step99-files0")
    assert checkpointer.find_resume("latest").name == "checkpoint-epoch0-step8-files0"
    other_shape = replace(config, model={"hidden_size": 64})
    with pytest.raises(CheckpointError, match="holds a model of shape"):
        make_checkpointer(other_shape).find_resume("latest")


def test_resume_looks_at_the_destination_too(tmp_path: Path) -> None:
    uploads = str(tmp_path / "uploads")
    first = make_config(tmp_path / "a", upload_destination=uploads, background_upload=False, archive_format="tar")
    writer = make_checkpointer(first)
    for step in (4, 8):
        writer.save(state_at(step), "scheduled")
    # A fresh machine: nothing local, both checkpoints at the destination.
    fresh = make_config(tmp_path / "b", upload_destination=uploads, background_upload=False, archive_format="tar")
    with pytest.raises(UploadError, match="already holds checkpoints"):
        make_checkpointer(fresh).find_resume(None)
    with pytest.raises(UploadError, match="would save under names that .* already holds"):
        make_checkpointer(fresh).find_resume("checkpoint-epoch0-step4-files0")
    target = make_checkpointer(fresh).find_resume("latest")
    assert target.name == "checkpoint-epoch0-step8-files0" and not target.own_copy
    assert (target.path / WEIGHTS).read_bytes() == b"weights of .tmp-checkpoint-epoch0-step8-files0"
    assert UploadManifest(fresh.checkpoint_dir, "").read()[target.name].state == "uploaded"  # not uploaded again


def test_a_download_that_fails_for_a_resume_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fill_the_disk(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume, "download_checkpoint", fill_the_disk)
    storage = open_destination(str(tmp_path / "uploads"))
    obj = ObjectInfo("checkpoint-epoch0-step4-files0.tar", 1000, None, None)
    with pytest.raises(UploadError, match="^downloading checkpoint-epoch0-step4-files0 from .*uploads to resume it "
                                          "failed: OSError: .*No space left on device$"):
        resume.fetch_for_resume(tmp_path / "checkpoints", "checkpoint-epoch0-step4-files0", obj, storage,
                                FakeAccelerator(), shares_first_process_disk=True)


def test_load_restores_the_train_state_and_refuses_another_stream(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    accelerator = FakeAccelerator()
    checkpointer = make_checkpointer(config, accelerator)
    saved = state_at(8, epoch=1, shard_cursor=1)
    checkpointer.save(saved, "scheduled")
    target = checkpointer.find_resume("latest")

    restored = TrainState(SPEC, TrainingMetrics())
    checkpointer.load(target, restored)
    assert accelerator.loaded == [target.path]
    assert (restored.step, restored.position) == (8, saved.position)
    assert restored.metrics.state_dict() == saved.metrics.state_dict()
    assert restored.checkpoint_name == target.name and checkpointer.last_saved_step == 8

    other_stream = TrainState(replace(SPEC, seed=1), TrainingMetrics())
    with pytest.raises(DataError, match="trained with seed=1234"):
        checkpointer.load(target, other_stream)
    (target.path / "checksums.json").unlink()  # as a checkpoint of an earlier version, allowed: loading itself fails
    (target.path / WEIGHTS).write_bytes(b"garbage")
    unverified = make_checkpointer(replace(config, allow_unverified_checkpoints=True), accelerator)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        unverified.load(target, TrainState(SPEC, TrainingMetrics()))


def test_a_resume_that_would_reshape_the_schedule_unasked_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_steps=8, warmup_steps=2)
    make_checkpointer(config).save(state_at(8), "scheduled")
    longer = replace(config, max_steps=12)  # lr_decay_steps unset: the cosine would stretch from 8 to 12 steps
    with pytest.raises(ConfigError, match="from 8 to 12 steps .*lr_decay_steps 8 to keep it.*lr_decay_steps 12"):
        make_checkpointer(longer).find_resume("latest")
    for kept in (replace(longer, lr_decay_steps=8), replace(config, lr_decay_steps=8)):
        assert schedule_changes(make_checkpointer(kept).find_resume("latest"), kept) == []
    stretched = replace(longer, lr_decay_steps=12, warmup_steps=5, min_lr_ratio=0.2)
    assert schedule_changes(make_checkpointer(stretched).find_resume("latest"), stretched) == [
        "lr_decay_steps: 8 -> 12", "warmup_steps: 2 -> 5", "min_lr_ratio: 0.1 -> 0.2"]


def test_a_damaged_or_malformed_checkpoint_is_one_line_naming_the_file(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    checkpointer = make_checkpointer(config)
    checkpointer.save(state_at(4), "scheduled")
    target = checkpointer.find_resume("latest")
    recorded = json.loads((target.path / "checksums.json").read_text())["files"]
    assert set(recorded) == {p.name for p in target.path.iterdir()} - {"checksums.json"}

    weights = target.path / WEIGHTS
    saved = weights.read_bytes()
    weights.write_bytes(saved.replace(b"weights", b"WEIGHTS"))  # same size, other bytes
    with pytest.raises(CheckpointError, match=f"{weights}: damaged \\(crc32c .*; resume from another checkpoint"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    weights.write_bytes(saved)
    (target.path / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match="random_states_0.pkl: missing"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))

    # A checkpoint of an earlier version records no checksums: loaded only when allowed, its RNG files must load.
    (target.path / "checksums.json").unlink()
    weights.write_bytes(b"weights again")
    write_rng_state(FakeAccelerator(), target.path)
    with pytest.raises(CheckpointError, match=f"^{target.path}: records no checksums.json .*; set "
                                              "allow_unverified_checkpoints .* to load it unverified$"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    checkpointer = make_checkpointer(replace(config, allow_unverified_checkpoints=True))
    checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    (target.path / "random_states_0.pkl").write_bytes(torch.load.__doc__.encode()[:10])  # truncated, say
    with pytest.raises(CheckpointError, match="random_states_0.pkl: unreadable"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    write_rng_state(FakeAccelerator(), target.path)
    (target.path / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="metadata.json: not a checkpoint's metadata"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    (target.path / "metadata.json").write_text('{"step": 4}')
    data_state = json.loads((target.path / "data_state.json").read_text())
    (target.path / "data_state.json").write_text(json.dumps({k: v for k, v in data_state.items() if k != "position"}))
    with pytest.raises(CheckpointError, match="unreadable train state"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))


@pytest.fixture
def accelerator() -> Iterator[Accelerator]:
    """A real Accelerator on the CPU, for saves that write what train.py writes."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def real_checkpointer(tmp_path: Path, accelerator: Accelerator, async_save: bool) -> Checkpointer:
    """A Checkpointer of the micro model, saving synchronously or in the background."""
    config = make_config(tmp_path, model=MICRO_MODEL, async_save=async_save)
    model = build_model(config.model_shape())
    prepared = accelerator.prepare(model, *make_optimizer(model, config, fused=False))
    checkpointer = Checkpointer(config, config.model_shape(), accelerator, None, shared_disk=True)
    checkpointer.start(lambda record: None, prepared, None)
    return checkpointer


@pytest.mark.parametrize("async_save", [False, True])
def test_the_weights_follow_the_umask_like_every_other_file(tmp_path: Path, accelerator: Accelerator,
                                                            async_save: bool) -> None:
    checkpointer = real_checkpointer(tmp_path, accelerator, async_save)
    umask = os.umask(0o027)
    try:
        checkpointer.save(state_at(4), "scheduled")
        checkpointer.wait_for_write()
    finally:
        os.umask(umask)
    saved = Path(checkpointer.config.checkpoint_dir) / "checkpoint-epoch0-step4-files0"
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in saved.iterdir()}
    assert WEIGHTS in modes and modes == dict.fromkeys(modes, 0o640)  # safetensors alone wrote 0600


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_that_fills_the_disk_leaves_no_temporary_folder(tmp_path: Path, accelerator: Accelerator,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               async_save: bool) -> None:
    checkpointer = real_checkpointer(tmp_path, accelerator, async_save)
    checkpointer.save(state_at(4), "scheduled")
    checkpointer.wait_for_write()
    save = torch.save

    def fill_the_disk(value: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        if Path(file).name == "optimizer.bin":  # after model.safetensors: the folder holds half a checkpoint
            Path(file).write_bytes(b"half an optimizer")
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        save(value, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_the_disk)
    folder = Path(checkpointer.config.checkpoint_dir)
    with pytest.raises(CheckpointError) as raised:
        checkpointer.save(state_at(8), "scheduled")
        checkpointer.wait_for_write()
    assert str(raised.value).startswith(f"saving checkpoint-epoch0-step8-files0 in {folder} failed: [Errno 28] No "
                                        f"space left on device: '{folder / '.tmp-checkpoint-epoch0-step8-files0'}")
    assert "\n" not in str(raised.value)
    assert [path.name for path in folder.iterdir()] == ["checkpoint-epoch0-step4-files0"]


def test_each_save_gives_its_true_reason(tmp_path: Path) -> None:
    by_steps = make_checkpointer(make_config(tmp_path / "a", max_steps=20, save_steps=4))
    assert [by_steps.save_reason(step, stopping, False) for step, stopping in ((4, False), (6, True), (20, False),
                                                                                (20, True))] == \
        ["scheduled", "stop requested", "final", "final"]
    by_time = make_checkpointer(make_config(tmp_path / "b", max_steps=20, save_every_minutes=30))
    assert by_time.save_reason(7, False, True) == "timed" and by_time.save_reason(20, False, True) == "final"
