"""A checkpoint folder as untrusted input (utils/checkpoints/untrusted.py): whoever can write its files can write its
checksums.json too, so nothing in it is unpickled in a way that runs code (resume, export, generate); a checkpoint
without checksums.json is refused unless allowed; an RNG file that does not load is an error, never skipped."""
import pickle
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import SPEC, FakeAccelerator, make_checkpointer, make_config, state_at
from safetensors.torch import load_file

from conftest import run_train, write_config
from scripts import export_hf, generate
from utils.checkpoints.checksums import record_checksums
from utils.errors import CheckpointError
from utils.train_state import TrainingMetrics, TrainState

OPTIONS = dict(max_steps=8, save_steps=4, lr_decay_steps=8)
STEP4 = "checkpoint-epoch0-step4-files0"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process


class RunsCode:
    """A value whose pickle, unpickled in full, writes `marker`: what a crafted checkpoint file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    """A run of 4 of its 8 steps: one checkpoint, to resume."""
    folder = tmp_path_factory.mktemp("run")
    result = run_train("--config", str(write_config(folder, sample_data, **OPTIONS)), "--max-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def copy_of_run(trained: Path, tmp_path: Path, sample_data: Path) -> tuple[Path, Path]:
    """The run copied (checkpoints and logs) with a config of its own: the config and the checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return write_config(run, sample_data, **OPTIONS), run / "checkpoints" / STEP4


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def as_sharded(checkpoint: Path, extra: dict | None = None) -> None:
    """The checkpoint as an FSDP run saves its model: a torch.distributed.checkpoint folder (with `extra` values)."""
    weights = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    dcp.save({"model": {**weights, **(extra or {})}}, checkpoint_id=str(checkpoint / "pytorch_model_fsdp_0"))


# --- item: nothing unpickled can run code --------------------------------------------------------

def test_a_crafted_rng_file_with_matching_checksums_is_refused_on_resume(trained: Path, tmp_path: Path,
                                                                         sample_data: Path) -> None:
    config, checkpoint = copy_of_run(trained, tmp_path, sample_data)
    marker, rng_file = tmp_path / "ran", checkpoint / "random_states_0.pkl"
    torch.save({"step": 0, "random_state": RunsCode(marker)}, rng_file)
    record_checksums(checkpoint)  # whoever crafts the files writes their checksums too
    result = run_train("--config", str(config), "--resume", "auto")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {rng_file}: unreadable (UnpicklingError: ")
    assert "GLOBAL exec" in lines[0] and "weights_only" not in lines[0]  # not torch's advice to load it anyway
    assert not marker.exists()
    torch.load(rng_file, weights_only=False)  # the file runs its code when unpickled in full
    assert marker.exists()


def test_a_crafted_rng_file_is_refused_in_an_allowed_unverified_checkpoint(tmp_path: Path) -> None:
    config = make_config(tmp_path, allow_unverified_checkpoints=True)
    accelerator = FakeAccelerator()
    checkpointer = make_checkpointer(config, accelerator)
    checkpointer.save(state_at(4), "scheduled")
    target = checkpointer.find_resume("latest")
    (target.path / "checksums.json").unlink()
    marker = tmp_path / "ran"
    torch.save({"step": 0, "random_state": RunsCode(marker)}, target.path / "random_states_0.pkl")
    with pytest.raises(CheckpointError, match=f"^{target.path / 'random_states_0.pkl'}: unreadable \\(Unpickling"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    assert not marker.exists() and accelerator.loaded == []


@pytest.mark.parametrize("metadata_file", [".metadata", "__0.metadata"])  # the second is read when the first fails
def test_a_crafted_sharded_metadata_is_refused_on_resume(tmp_path: Path, metadata_file: str) -> None:
    accelerator = FakeAccelerator()
    checkpointer = make_checkpointer(make_config(tmp_path), accelerator)
    checkpointer.save(state_at(4), "scheduled")
    target = checkpointer.find_resume("latest")
    marker, sharded = tmp_path / "ran", target.path / "optimizer_0"
    sharded.mkdir()
    (sharded / metadata_file).write_bytes(pickle.dumps(RunsCode(marker)))
    record_checksums(target.path)
    with pytest.raises(CheckpointError) as refused:
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    assert str(refused.value) == (f"{sharded / metadata_file}: refused (it names builtins.exec, not one of the data "
                                  "classes of a sharded checkpoint's metadata)")
    assert not marker.exists() and accelerator.loaded == []


def test_a_crafted_value_in_a_sharded_optimizer_is_refused_on_resume(tmp_path: Path) -> None:
    # torch.distributed.checkpoint unpickles the non-tensor values (param_groups) with weights_only=False.
    accelerator = FakeAccelerator()
    checkpointer = make_checkpointer(make_config(tmp_path), accelerator)
    checkpointer.save(state_at(4), "scheduled")
    target = checkpointer.find_resume("latest")
    marker = tmp_path / "ran"
    dcp.save({"optimizer": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]}},
             checkpoint_id=str(target.path / "optimizer_0"))
    record_checksums(target.path)
    checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))  # genuine values pass
    shutil.rmtree(target.path / "optimizer_0")
    dcp.save({"optimizer": {"param_groups": [{"lr": RunsCode(marker), "betas": (0.9, 0.95)}]}},
             checkpoint_id=str(target.path / "optimizer_0"))
    record_checksums(target.path)
    with pytest.raises(CheckpointError, match=f"^{target.path / 'optimizer_0'}/__0_0.distcp: "
                                              "optimizer.param_groups.0.lr refused \\(UnpicklingError: .*GLOBAL exec"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    assert not marker.exists() and accelerator.loaded == [target.path]  # loaded once, the genuine one


@pytest.mark.parametrize("metadata_file", [".metadata", "__0.metadata"])
def test_a_crafted_sharded_metadata_is_refused_by_export_and_generate(trained: Path, tmp_path: Path,
                                                                      metadata_file: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / STEP4
    shutil.copytree(trained / "checkpoints" / STEP4, checkpoint)
    as_sharded(checkpoint)
    marker, sharded = tmp_path / "ran", checkpoint / "pytorch_model_fsdp_0"
    (sharded / ".metadata").unlink()
    (sharded / metadata_file).write_bytes(pickle.dumps(RunsCode(marker)))
    record_checksums(checkpoint)
    assert export_hf.main([str(checkpoint), str(tmp_path / "hf")]) == 2
    assert generate.main([str(checkpoint), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    refusal = (f"error: {sharded / metadata_file}: refused (it names builtins.exec, not one of the data classes of a "
               "sharded checkpoint's metadata)")
    assert capsys.readouterr().err.splitlines() == [refusal, refusal]
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_a_crafted_value_in_a_sharded_model_is_refused_by_export(trained: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / STEP4
    shutil.copytree(trained / "checkpoints" / STEP4, checkpoint)
    marker = tmp_path / "ran"
    as_sharded(checkpoint, extra={"note": RunsCode(marker)})
    record_checksums(checkpoint)
    assert export_hf.main([str(checkpoint), str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {checkpoint / 'pytorch_model_fsdp_0'}/__0_0.distcp: model.note refused "
                            "(UnpicklingError: ") and len(error.splitlines()) == 1
    assert not marker.exists()


# --- item: no checksums.json, no load (unless allowed) ---------------------------------------------

def damage_weights(checkpoint: Path) -> None:
    """64 bytes of the tensors changed (one bit each: still finite numbers), checksums.json deleted."""
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(byte ^ 0x01 for byte in data[middle:middle + 64])
    weights.write_bytes(bytes(data))
    (checkpoint / "checksums.json").unlink()


def test_damaged_weights_without_checksums_are_refused_unless_allowed(trained: Path, tmp_path: Path,
                                                                      sample_data: Path) -> None:
    config, checkpoint = copy_of_run(trained, tmp_path, sample_data)
    damage_weights(checkpoint)
    result = run_train("--config", str(config), "--resume", "latest")
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: {checkpoint}: records no checksums.json (saved by an earlier version, or the file was lost), so its "
        "files cannot be verified; set allow_unverified_checkpoints (--set allow_unverified_checkpoints=true) to load "
        "it unverified"]
    result = run_train("--config", str(config), "--resume", "latest", "--set", "allow_unverified_checkpoints=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{checkpoint}: records no checksums.json: its files are NOT verified" in result.stderr
    assert "Resumed from checkpoint-epoch0-step4-files0" in result.stderr


def test_export_and_generate_refuse_a_checkpoint_without_checksums_unless_allowed(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = tmp_path / STEP4
    shutil.copytree(trained / "checkpoints" / STEP4, checkpoint)
    damage_weights(checkpoint)
    assert export_hf.main([str(checkpoint), str(tmp_path / "hf")]) == 2
    assert generate.main([str(checkpoint), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    refusal = (f"error: {checkpoint}: records no checksums.json (saved by an earlier version, or the file was lost), "
               "so its files cannot be verified; pass --allow-unverified to load it unverified")
    assert capsys.readouterr().err.splitlines() == [refusal, refusal]
    assert not (tmp_path / "hf").exists()

    assert export_hf.main([str(checkpoint), str(tmp_path / "hf"), "--allow-unverified"]) == 0
    assert generate.main([str(checkpoint), "--prompt", "x", "--max-new-tokens", "2", "--allow-unverified"]) == 0
    warnings = [record.getMessage() for record in caplog.records if "NOT verified" in record.getMessage()]
    assert warnings == [f"⚠️  {checkpoint}: records no checksums.json: its files are NOT verified (a damaged file is "
                        "loaded as it is); loading it because unverified checkpoints are allowed"] * 2


# --- item: an RNG file that does not load is an error, not skipped ---------------------------------

def test_an_rng_file_that_does_not_load_is_refused_even_when_its_checksum_matches(tmp_path: Path) -> None:
    accelerator = FakeAccelerator()
    checkpointer = make_checkpointer(make_config(tmp_path), accelerator)
    checkpointer.save(state_at(4), "scheduled")
    target = checkpointer.find_resume("latest")
    rng_file = target.path / "random_states_0.pkl"
    rng_file.write_bytes(rng_file.read_bytes()[:100])  # truncated when written, say: the checksum is of this
    record_checksums(target.path)
    with pytest.raises(CheckpointError, match=f"^{rng_file}: unreadable \\("):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    torch.save({"step": 0}, rng_file)  # loads, but restores nothing: Accelerate would skip it without a word
    record_checksums(target.path)
    with pytest.raises(CheckpointError, match=f"^{rng_file}: not an RNG state \\(no random_state, numpy_random_seed, "
                                              "torch_manual_seed\\)$"):
        checkpointer.load(target, TrainState(SPEC, TrainingMetrics()))
    assert accelerator.loaded == []
    unverified = make_checkpointer(replace(checkpointer.config, allow_unverified_checkpoints=True), accelerator)
    (target.path / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="not an RNG state"):  # the same without checksums
        unverified.load(target, TrainState(SPEC, TrainingMetrics()))
