"""train.py as a GPU run uses it, on CPU processes, with the faults a preemptible fleet meets, for
tests/e2e/test_production_path.py. Launch it like train.py (scripts/launch.py --nproc_per_node 2 ...).

FSDP runs on CPU processes here (tests/e2e/cpu_fsdp.py), as Accelerate runs it only on GPUs.
KILL_DURING_WRITE=N: during the Nth background write, once its state files are on disk but before the checkpoint
    is complete (no JSON files, no checksums, not renamed), the whole launch dies at once, as a machine does: the
    launcher and every worker get SIGKILL.
SIGTERM_AT_STEP=K: once step K is done, the first process sends SIGTERM to the launcher, as a preemption notice
    does; the launcher passes it on to every worker.
"""
import os
import signal
import sys
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

from cpu_fsdp import enable_fsdp_on_cpu  # noqa: E402

import train  # noqa: E402
from utils.checkpoints.writer import ShardedSnapshot, StateSnapshot

FIRST_PROCESS = os.environ.get("RANK", "0") == "0"


def kill_the_launch() -> None:
    """SIGKILL to the launcher, then to every worker, this one last: nothing gets to clean up."""
    launcher = psutil.Process(os.getppid())
    workers = [worker for worker in launcher.children() if worker.pid != os.getpid()]
    for process in (launcher, *workers):
        process.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def dies_during_write(write: Any, nth: int) -> Any:
    """`write` (a snapshot's write), after which the Nth call on the first process kills the launch."""
    calls = [0]

    def write_then_die(self: Any, folder: Path) -> None:
        write(self, folder)
        if FIRST_PROCESS:
            calls[0] += 1
            if calls[0] == nth:
                kill_the_launch()

    return write_then_die


def signals_the_launcher_at(train_step: Any, step: int) -> Any:
    def train_step_then_signal(run: Any, loader: Any, state: Any, window: Any) -> None:
        train_step(run, loader, state, window)
        if FIRST_PROCESS and state.step == step:
            os.kill(os.getppid(), signal.SIGTERM)

    return train_step_then_signal


if "KILL_DURING_WRITE" in os.environ:
    nth_write = int(os.environ["KILL_DURING_WRITE"])
    StateSnapshot.write = dies_during_write(StateSnapshot.write, nth_write)
    ShardedSnapshot.write = dies_during_write(ShardedSnapshot.write, nth_write)
if "SIGTERM_AT_STEP" in os.environ:
    train.train_step = signals_the_launcher_at(train.train_step, int(os.environ["SIGTERM_AT_STEP"]))
enable_fsdp_on_cpu()
sys.exit(train.main())
