"""FSDP on two CPU processes (tests/e2e/train_with_cpu_fsdp.py turns it on where Accelerate allows it only on GPUs):
it trains what DDP trains, export reads its sharded checkpoints, and a shard that one process cannot write stops
the run in one line. Its asynchronous saves, exact resume, kill -9 and SIGTERM: tests/e2e/test_production_path.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, free_port, run_sh_env
from torch.distributed.checkpoint.api import CheckpointException

import utils.checkpoints.ownership
from configs.training_config import ConfigError
from conftest import REPO_ROOT, read_metrics, write_config
from utils.checkpoints.export import load_checkpoint_model, saved_weights
from utils.checkpoints.folders import list_checkpoints
from utils.checkpoints.ownership import check_sharded_checkpoints_share_a_disk
from utils.checkpoints.writer import one_line_save_error
from utils.errors import CheckpointError

OPTIONS = dict(fsdp=True, max_steps=6, save_steps=2, lr_decay_steps=6)
STEP2, STEP6 = "checkpoint-epoch0-step2-files0", "checkpoint-epoch0-step6-files0"


def launch(folder: Path, script: str, *args: str, fail_write: str | None = None) -> subprocess.CompletedProcess:
    """Two CPU processes, as `accelerate launch --multi_gpu` starts them on two GPUs; fail_write: RANK:PART:N, that
    process's Nth write of PART fails (tests/e2e/train_with_cpu_fsdp.py; the launch is then expected to fail)."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / script), "--config", str(folder / "config.json"), *args]
    env = {**run_sh_env(2), **({"FAIL_SHARDED_WRITE": fail_write} if fail_write else {})}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == (0 if fail_write is None else 1), (result.stdout + result.stderr)[-3000:]
    return result


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(line["step"], line["loss"]) for line in read_metrics(folder / "logs")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> dict[str, Path]:
    """Six steps with a checkpoint every two, under DDP and under FSDP (synchronous saves; asynchronous ones, with
    the rest of the GPU path, are tests/e2e/test_production_path.py's)."""
    folders = {}
    for name, values in (("ddp", {**OPTIONS, "fsdp": False}), ("sync", {**OPTIONS, "async_save": False})):
        folder = folders[name] = tmp_path_factory.mktemp(name)
        write_config(folder, sample_data, **values)
        launch(folder, "train.py" if name == "ddp" else "tests/e2e/train_with_cpu_fsdp.py")
    return folders


def test_fsdp_trains_what_ddp_trains(runs: dict[str, Path]) -> None:
    ddp, fsdp = losses(runs["ddp"]), losses(runs["sync"])
    assert [step for step, _ in fsdp] == [1, 2, 3, 4, 5, 6]
    # Reduce-scatter of shards against all-reduce of buckets: the same sums in another order.
    assert [loss for _, loss in fsdp] == pytest.approx([loss for _, loss in ddp], rel=1e-5)
    assert (runs["sync"] / "checkpoints" / STEP6 / "pytorch_model_fsdp_0").is_dir()
    assert not (runs["sync"] / "checkpoints" / STEP6 / "model.safetensors").exists()


def test_export_reads_a_sharded_checkpoint_as_trained(runs: dict[str, Path]) -> None:
    # export_hf and generate gather the shards into whole tensors: DDP's weights, to float rounding.
    sharded = saved_weights(runs["sync"] / "checkpoints" / STEP6)
    whole = saved_weights(runs["ddp"] / "checkpoints" / STEP6)
    assert sharded.keys() == whole.keys()
    assert_same_weights(whole, sharded)
    model = load_checkpoint_model(runs["sync"] / "checkpoints" / STEP6)
    assert torch.equal(model.gpt_neox.embed_in.weight.detach(), sharded["gpt_neox.embed_in.weight"])


@pytest.mark.parametrize("max_steps", [100, 4])  # found by the next save, or (the last save's) at the end
def test_a_shard_that_one_process_cannot_write_stops_the_run_without_another_save(
        max_steps: int, sample_data: Path, tmp_path: Path) -> None:
    # Process 1's weights of the second checkpoint fail, while the optimizer parts are still being written: every
    # process's save fails with it, and each waits for its other part before going on.
    write_config(tmp_path, sample_data, **{**OPTIONS, "max_steps": max_steps, "lr_decay_steps": 100},
                 async_save=True)
    result = launch(tmp_path, "tests/e2e/train_with_cpu_fsdp.py", fail_write="1:pytorch_model_fsdp_0:2")
    step4 = "checkpoint-epoch0-step4-files0"
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # one, the main process's
    assert lines == [f"error: saving {step4} in {tmp_path / 'checkpoints'} failed: process 1: OSError: [Errno 28] "
                     f"No space left on device (injected): '{tmp_path / 'checkpoints' / ('.tmp-' + step4)}"
                     f"/pytorch_model_fsdp_0'; saved {STEP2}"]
    assert [info.name for info in list_checkpoints(tmp_path / "checkpoints")] == [STEP2]
    assert max(step for step, _ in losses(tmp_path)) < 10  # stopped at once, not at max_steps
    # Every process ended cleanly (the launcher's own ChildFailedError traceback aside): no write outlived its group.
    for crash in ("[rank0]: Traceback", "[rank1]: Traceback", "terminate called", "Exception in thread"):
        assert crash not in result.stderr, result.stderr[-3000:]


def test_a_failed_sharded_write_is_one_line_naming_the_process_and_its_error(tmp_path: Path) -> None:
    # torch.distributed.checkpoint raises every process's traceback at once; the line keeps the first cause.
    failure = CheckpointException("save failed", {1: (OSError(28, "No space left on device"), None)})
    with pytest.raises(CheckpointError) as raised:
        with one_line_save_error(STEP2, tmp_path):
            raise failure
    assert str(raised.value) == (f"saving {STEP2} in {tmp_path} failed: process 1: OSError: [Errno 28] No space "
                                 "left on device")


def test_fsdp_is_refused_when_the_machines_do_not_share_the_checkpoint_folder(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    check_sharded_checkpoints_share_a_disk(accelerator, True, tmp_path)  # one machine
    # What every process learns from the others: the second machine does not see the first one's folder.
    monkeypatch.setattr(utils.checkpoints.ownership, "gather_object", lambda values: [True, False])
    with pytest.raises(ConfigError, match=f"fsdp: every process writes its part of each checkpoint into {tmp_path}, "
                                          "which the machines do not share"):
        check_sharded_checkpoints_share_a_disk(accelerator, True, tmp_path)
