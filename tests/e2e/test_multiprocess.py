"""Two CPU processes started by run.sh (accelerate launch, gloo) train exactly what one process trains with
the same global batch (eager, and compiled with gradient accumulation: the default path on GPUs), stop
together when only one of them is signalled, and stop without hanging when one cannot fetch a shard."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import assert_same_weights, free_port, run_sh_env
from safetensors.torch import load_file

from conftest import REPO_ROOT, read_metrics, run_train, write_config

STEP2, STEP4 = "checkpoint-epoch0-step2-files0", "checkpoint-epoch0-step4-files0"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("step")[1].split("-")[0])


def final_checkpoint(folder: Path) -> Path:
    return max((folder / "checkpoints").glob("checkpoint-*"), key=step_of)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, sample_data: Path) -> None:
    runs = {}
    for processes, micro_batch in ((1, 4), (2, 2)):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        config = write_config(folder, sample_data, max_steps=4, save_steps=4, per_device_train_batch_size=micro_batch)
        if processes == 1:
            result = run_train("--config", str(config))
        else:  # as a user starts it: run.sh's `accelerate launch`, here with two CPU "GPUs"
            result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), str(config)], cwd=REPO_ROOT,
                                    env=run_sh_env(2), capture_output=True, text=True, timeout=240)
            assert "x 2 processes" in result.stderr
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = folder

    one, two = (read_metrics(runs[n] / "logs") for n in (1, 2))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["tokens_seen"] for r in one] == [r["tokens_seen"] for r in two]
    for a, b in zip(one, two):
        # Each process averages the loss of its half; DDP averages the gradients: the same mean over the
        # same four samples. Only the order of float sums differs.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert one[0]["loss"] != one[1]["loss"]  # the steps saw different data, so equal losses are not a fluke

    weights = [load_file(str(final_checkpoint(runs[n]) / "model.safetensors")) for n in (1, 2)]
    assert weights[0].keys() == weights[1].keys()  # DDP's "module." prefix is not saved
    assert_same_weights(weights[0], weights[1])
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in final_checkpoint(runs[2]).iterdir()}


def test_compiled_processes_with_accumulation_match_one_eager_process(tmp_path: Path, sample_data: Path) -> None:
    # GPU runs compile by default: torch.compile over DDP, gradients all-reduced only on the last micro-batch
    # (no_sync before), the fused AdamW, checkpoints written in the background. Inductor compiles on CPU too, so
    # the whole wiring runs here, against eager.
    runs = {}
    for processes, micro_batch, compile_model in ((1, 2, False), (2, 1, True)):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        config = write_config(folder, sample_data, max_steps=4, save_steps=4, gradient_accumulation_steps=2,
                              per_device_train_batch_size=micro_batch, compile=compile_model, fused_adamw=True,
                              async_save=True)
        if processes == 1:
            result = run_train("--config", str(config))
        else:
            result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), str(config)], cwd=REPO_ROOT,
                                    env={**run_sh_env(2), "TORCH_LOGS": "dynamo,recompiles"},
                                    capture_output=True, text=True, timeout=300)
            assert "Step 2: done compiler function" in result.stderr  # compiled indeed (by DDP's bucketing compiler)
            # Switching between no_sync and synced micro-batches must not recompile the model every step.
            assert "Recompiling function" not in result.stderr
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = folder

    eager, compiled = (read_metrics(runs[n] / "logs") for n in (1, 2))
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled):  # compiled kernels sum in another order: close, not bit-equal
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    weights = [load_file(str(final_checkpoint(runs[n]) / "model.safetensors")) for n in (1, 2)]
    # No "_orig_mod." from torch.compile nor "module." from DDP in the checkpoint written in the background.
    assert weights[0].keys() == weights[1].keys()
    assert_same_weights(weights[0], weights[1])


def run_two_machines(config: Path, folder: Path, *args: str, shared_disk: bool = False
                     ) -> list[subprocess.CompletedProcess]:
    """Two "machines" on this host, one CPU process each, as run.sh starts them on two nodes; each has its own
    checkpoint disk (folder/disk0, folder/disk1), or both use folder/disk0 (shared_disk), and its own log
    folder. The upload destination is the config's."""
    port = str(free_port())
    starts = [subprocess.Popen(["bash", str(REPO_ROOT / "run.sh"), str(config), *args, "--checkpoint-dir",
                                str(folder / f"disk{0 if shared_disk else rank}"), "--log-dir",
                                str(folder / f"logs{rank}")], cwd=REPO_ROOT,
                               env={**run_sh_env(1), "NUM_MACHINES": "2", "MACHINE_RANK": str(rank), "MAIN_PORT": port},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for start in starts:
        stdout, stderr = start.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(start.args, start.returncode, stdout, stderr))
    return results


def test_machines_with_their_own_disks_resume_from_the_same_checkpoint(tmp_path: Path, sample_data: Path) -> None:
    # The first process chooses the checkpoint for all; another machine's disk lacks it, so that machine
    # downloads it from the upload destination, or every process stops when the destination lacks it too.
    uploads = tmp_path / "uploads"
    config = write_config(tmp_path, sample_data, max_steps=4, save_steps=2, per_device_train_batch_size=1,
                          upload_destination=str(uploads), lr_decay_steps=6)  # one schedule for 4 and 6 steps
    for result in run_two_machines(config, tmp_path):
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "disk0").glob("checkpoint-*")) == [STEP2, STEP4]
    assert not any((tmp_path / "disk1").iterdir())  # machine 1's RNG-only save folders are not left behind

    archive = uploads / f"{STEP4}.files.json"
    archive.rename(tmp_path / "step4-archive")  # now only machine 0 holds step 4: machine 1 cannot resume it
    machine0, machine1 = run_two_machines(config, tmp_path, "6", "--resume", "latest")
    assert machine0.returncode != 0 and machine1.returncode != 0
    assert f"error: {STEP4}: another process could not get this checkpoint" in machine0.stderr
    assert (f"error: {tmp_path}/disk1/{STEP4}: the checkpoint to resume is not on this machine nor at the upload "
            "destination") in machine1.stderr
    assert read_metrics(tmp_path / "logs0")[-1]["step"] == 4  # nobody trained on

    (tmp_path / "step4-archive").rename(archive)
    for result in run_two_machines(config, tmp_path, "6", "--resume", "latest"):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored checkpoint-epoch0-step4-files0" in results_text(result)  # machine 1 downloaded it,
    assert not list((tmp_path / "disk1").glob("*checkpoint-*"))  # and deleted its copy once loaded
    resumed = read_metrics(tmp_path / "logs0")

    straight = tmp_path / "straight"
    straight.mkdir()
    result = run_train("--config", str(write_config(straight, sample_data, max_steps=6, save_steps=6,
                                                    per_device_train_batch_size=2, lr_decay_steps=6)))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = read_metrics(straight / "logs")
    assert [r["step"] for r in resumed] == [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, resumed):  # what one process trains straight through with the same global batch
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_machines_sharing_a_disk_save_one_checkpoint_together(tmp_path: Path, sample_data: Path) -> None:
    # On a shared filesystem every process's part lands in the one checkpoint, and nothing of it is deleted.
    config = write_config(tmp_path, sample_data, max_steps=2, save_steps=2, per_device_train_batch_size=1)
    for result in run_two_machines(config, tmp_path, shared_disk=True):
        assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "disk0").glob("*checkpoint-*")] == [STEP2]
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {
        path.name for path in (tmp_path / "disk0" / STEP2).iterdir()}


def results_text(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def start_run_sh(config: Path) -> subprocess.Popen:
    """A long run on two CPU processes, started as a user starts it."""
    return subprocess.Popen(["bash", str(REPO_ROOT / "run.sh"), str(config)], cwd=REPO_ROOT, env=run_sh_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_launch(launcher: subprocess.Popen) -> None:
    """A launch a test leaves running (it failed before the launch ended): the launcher and all it started."""
    if launcher.poll() is None:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            child.kill()
        launcher.kill()


def training_workers(launcher: subprocess.Popen, log_dir: Path) -> list[psutil.Process]:
    """Once the run has logged three steps: its two train.py processes."""
    metrics = log_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    workers = [child for child in psutil.Process(launcher.pid).children(recursive=True)
               if "train.py" in " ".join(child.cmdline())]
    assert len(workers) == 2
    return workers


def test_signal_to_one_process_stops_both_at_the_same_step(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=100_000, save_steps=100_000, logging_steps=1)
    process = start_run_sh(config)
    try:
        workers = training_workers(process, tmp_path / "logs")
        workers[-1].send_signal(signal.SIGTERM)  # only one worker hears it, as when one node is preempted
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # the test failed: leave no training processes behind
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
    saved = final_checkpoint(tmp_path)
    assert "(stop requested)" in stderr, stderr[-3000:]
    assert process.returncode != 0  # a stopped run is not a finished one
    # The collective save completed (the other process took part), with both processes' RNG states.
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    assert step_of(saved) == read_metrics(tmp_path / "logs")[-1]["step"] < 100_000


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_saves_and_ends_with_the_shells_exit_code(tmp_path: Path, sample_data: Path,
                                                                            signal_number: int) -> None:
    # SIGTERM: a preemption notice; SIGINT: Ctrl+C (the launcher's process group alone: the workers run in
    # sessions of their own, so they hear it once, from the launcher).
    config = write_config(tmp_path, sample_data, max_steps=100_000, save_steps=100_000, logging_steps=1,
                          lr_decay_steps=100_000)
    launcher = start_run_sh(config)
    try:
        training_workers(launcher, tmp_path / "logs")
        launcher.send_signal(signal_number)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        kill_launch(launcher)
    assert launcher.returncode == 128 + signal_number, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr and "ChildFailedError" not in stderr
    saved = final_checkpoint(tmp_path)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in saved.iterdir()}
    assert step_of(saved) == read_metrics(tmp_path / "logs")[-1]["step"]


def test_a_failing_worker_ends_the_launch_with_its_error_line_and_code(tmp_path: Path, sample_data: Path) -> None:
    config = write_config(tmp_path, sample_data, max_steps=4, save_steps=4)
    result = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), str(config), "--resume",
                             "checkpoint-epoch0-step9-files0"], cwd=REPO_ROOT, env=run_sh_env(2), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert "error: checkpoint 'checkpoint-epoch0-step9-files0' not found" in result.stderr


def test_a_worker_killed_by_sigkill_ends_the_run_in_one_line_per_process(tmp_path: Path, sample_data: Path) -> None:
    # A worker killed outright (the kernel's OOM killer, say) cannot say why; the other finds its collective broken.
    config = write_config(tmp_path, sample_data, max_steps=100_000, save_steps=100_000, logging_steps=1)
    launcher = start_run_sh(config)
    try:
        killed = training_workers(launcher, tmp_path / "logs")[-1]
        killed.kill()
        _, stderr = launcher.communicate(timeout=120)
    finally:
        kill_launch(launcher)
    assert launcher.returncode == 128 + signal.SIGKILL, stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    assert re.search(rf"^launcher: worker [01] \(pid {killed.pid}\) was killed by SIGKILL$", stderr, re.MULTILINE)
    lost = [line for line in stderr.splitlines() if line.startswith("error: lost another process of this run (")]
    assert len(lost) == 1 and lost[0].endswith("resume from the newest checkpoint (--resume latest)")


def test_workers_save_and_stop_when_the_launcher_is_killed(tmp_path: Path, sample_data: Path) -> None:
    # kill -9 of the launcher alone (a supervisor, `timeout -s KILL`) leaves its workers running: unseen,
    # they would race the user's next run in the same folder. They notice, save together and stop.
    config = write_config(tmp_path, sample_data, max_steps=100_000, save_steps=100_000, logging_steps=1)
    launcher = start_run_sh(config)  # run.sh execs the launcher
    workers: list[psutil.Process] = []
    try:
        workers = training_workers(launcher, tmp_path / "logs")
        launcher.kill()
        _, stderr = launcher.communicate(timeout=120)  # the pipes close when the workers are gone too
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
    assert stderr.count(f"The launcher (pid {launcher.pid}) is gone") == 2
    saved = final_checkpoint(tmp_path)
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    assert step_of(saved) == read_metrics(tmp_path / "logs")[-1]["step"]  # nothing trained after the save


def test_a_shard_one_process_cannot_fetch_stops_the_run_instead_of_hanging(tmp_path: Path,
                                                                          sample_data: Path) -> None:
    # The other process cannot know: a collective save would wait for it forever. The failing process
    # exits with its error line and the launcher stops the other; the checkpoints saved before stand.
    # Shard by shard, so that the second fetch comes after a shard of training (in windows, the first window
    # would fetch all of the sample's shards before the first step).
    config = write_config(tmp_path, sample_data, max_steps=100_000, save_steps=50, prefetch_batches=1,
                          shuffle_window_shards=1, mix_whole_dataset=False)
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / "tests" / "e2e" / "train_with_failing_fetch.py"), "--config", str(config)]
    result = subprocess.run(command, cwd=REPO_ROOT, env={**run_sh_env(2), "FAIL_AT": "2"}, capture_output=True,
                            text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: tokenized_" in output and "download failed (injected, rank 1 only)" in output
    saved = list((tmp_path / "checkpoints").glob("checkpoint-*"))
    assert saved  # training went on until the failure
    for checkpoint in saved:  # each written by both processes together
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {
            path.name for path in checkpoint.iterdir()}
