"""The path a run takes on GPUs, on two CPU processes over gloo: every default that switches on only under CUDA,
forced on together, under DDP and under FSDP exactly as configured on GPUs.

    ddp:  DDP + asynchronous saves + torch.compile + bf16 autocast + the fused AdamW, accumulating 2 micro-batches
    fsdp: the same under FSDP2 (bf16 compute, fp32 reduce-scatter, each layer compiled on its own)

For each, an uninterrupted run with synchronous saves is the reference, and a chain of runs with asynchronous
saves meets what a preemptible fleet does to a run: a kill -9 of every process during a background write, a
resume (--resume auto), a SIGTERM (a preemption notice), a resume to the end. The chain trains the reference's
losses bit for bit and writes its checkpoints byte for byte (the arithmetic is deterministic here: the same kernels
on the same inputs in the same order, one thread per process, gloo's fixed reduction order).

What a CPU cannot run, and so these tests do not: pinned host buffers (they need CUDA; the copies are plain here,
the same code path otherwise), NCCL (gloo carries the same collectives), inductor's GPU kernels (torch.compile runs
with the aot_eager backend: dynamo's capture, DDP's graph splitting, AOTAutograd's joint graph and the autocast
inside it, as inductor gets them, then eager kernels; tests/e2e/test_multiprocess.py compiles with inductor itself),
TF32 and CUDA's own RNG states.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import free_port

from conftest import REPO_ROOT, read_metrics, write_config
from utils.checkpoints.export import load_checkpoint_model, saved_weights
from utils.checkpoints.folders import list_checkpoints

GPU_DEFAULTS = dict(compile=True, compile_backend="aot_eager", mixed_precision="bf16", fused_adamw=True)
COMBINATIONS = {"ddp": GPU_DEFAULTS, "fsdp": {**GPU_DEFAULTS, "fsdp": True}}
RUN = dict(max_steps=10, lr_decay_steps=10, save_steps=2, keep_checkpoints=100, per_device_train_batch_size=1,
           gradient_accumulation_steps=2)
KILLED_WRITE = 2  # the background write of step 4's checkpoint
SIGTERM_AT_STEP = 6
RUN_SPECIFIC = {"metadata.json", "training_config.json",  # times, paths, async_save itself
                "pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata"}  # the path the shards were written to


def checkpoint(step: int) -> str:
    return f"checkpoint-epoch0-step{step}-files0"


def launch(folder: Path, *args: str, **faults: int) -> subprocess.CompletedProcess:
    """Two CPU processes through scripts/launch.py, as run.sh starts one per GPU; `faults` as in
    tests/e2e/train_production_path.py."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "launch.py"), "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(REPO_ROOT / "tests" / "e2e" / "train_production_path.py"),
               "--config", str(folder / "config.json"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           **{name.upper(): str(value) for name, value in faults.items()}}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@dataclass
class Chain:
    reference: Path
    """The uninterrupted run, saving synchronously."""
    folder: Path
    """The interrupted run, saving asynchronously."""
    killed: subprocess.CompletedProcess
    left_by_the_kill: list[str]
    """checkpoint_dir's entries after the kill -9."""
    resumed_then_stopped: subprocess.CompletedProcess
    finished: subprocess.CompletedProcess


@pytest.fixture(scope="module", params=sorted(COMBINATIONS))
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Chain:
    settings = {**RUN, **COMBINATIONS[request.param]}
    reference, folder = tmp_path_factory.mktemp(f"{request.param}-reference"), tmp_path_factory.mktemp(request.param)
    write_config(reference, sample_data, **settings, async_save=False)
    result = launch(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    write_config(folder, sample_data, **settings, async_save=True)
    killed = launch(folder, kill_during_write=KILLED_WRITE)
    left = sorted(path.name for path in (folder / "checkpoints").iterdir())
    resumed = launch(folder, "--resume", "auto", sigterm_at_step=SIGTERM_AT_STEP)
    finished = launch(folder, "--resume", "auto")
    return Chain(reference, folder, killed, left, resumed, finished)


def test_a_kill_9_during_a_background_write_leaves_no_checkpoint_that_looks_complete(chain: Chain) -> None:
    assert chain.killed.returncode == -9, chain.killed.stderr[-3000:]
    assert {name for name in chain.left_by_the_kill if "checkpoint-" in name} == {
        checkpoint(2), f".tmp-{checkpoint(4)}"}
    assert "Resumed from checkpoint-epoch0-step2-files0" in chain.resumed_then_stopped.stderr
    assert f"Removed .tmp-{checkpoint(4)}" in chain.resumed_then_stopped.stderr


def test_sigterm_saves_where_every_process_stops_and_the_run_resumes_there(chain: Chain) -> None:
    assert chain.resumed_then_stopped.returncode == 128 + 15, chain.resumed_then_stopped.stderr[-3000:]
    assert chain.finished.returncode == 0, chain.finished.stderr[-3000:]
    stopped_at = int(chain.finished.stderr.split("Resumed from checkpoint-epoch0-step")[1].split("-")[0])
    assert SIGTERM_AT_STEP <= stopped_at < RUN["max_steps"]
    assert "(stop requested)" in chain.resumed_then_stopped.stderr


def test_the_chain_trains_the_uninterrupted_losses_bit_for_bit(chain: Chain) -> None:
    expected = [(line["step"], line["loss"], line["grad_norm"]) for line in read_metrics(chain.reference / "logs")]
    assert [step for step, _, _ in expected] == list(range(1, RUN["max_steps"] + 1))
    assert [(line["step"], line["loss"], line["grad_norm"]) for line in read_metrics(chain.folder / "logs")] == expected
    assert expected[0][1] != expected[1][1]  # each step saw new data


def test_asynchronous_checkpoints_are_the_synchronous_ones_byte_for_byte(chain: Chain) -> None:
    saved = {info.name: info.path for info in list_checkpoints(chain.folder / "checkpoints")}
    for info in list_checkpoints(chain.reference / "checkpoints"):
        expected, written = checksums(info.path), checksums(saved[info.name])
        assert set(written) == set(expected), info.name  # tensor files, every process's RNG file, JSON files
        assert {"random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"} <= set(written)
        assert {name for name in expected if written[name] != expected[name]} <= RUN_SPECIFIC, info.name
    # The weights under their model's own names (no "module." from DDP, no "_orig_mod." from torch.compile), as
    # export, generate and --resume read them.
    final = saved[checkpoint(RUN["max_steps"])]
    weights = saved_weights(final)
    model = load_checkpoint_model(final)
    assert set(weights) == set(model.state_dict())
    assert torch.equal(model.gpt_neox.embed_in.weight.detach(), weights["gpt_neox.embed_in.weight"])


def checksums(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "checksums.json").read_text())["files"]
