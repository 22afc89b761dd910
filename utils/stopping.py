"""Stopping a run: stop requests (Ctrl+C, SIGTERM, SIGHUP, a launcher that died), the vote by which every process
stops at the same step, divergence, a lost process, and the exit code each ends with.

Exit codes: 0 done; 1 stopped by the run itself (a failed write, logs that cannot be written, another process
lost, uploads left unverified); 2 bad input (ConfigError, DataError, CheckpointError); 3 diverged; 128 + N after
signal N (130 Ctrl+C, 143 SIGTERM, 129 SIGHUP), as a shell reports it.
"""
import os
import re
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator

from configs.training_config import ConfigError
from utils.errors import AlreadyReported, CheckpointError, DataError, ExportError


class StopVote:
    """All processes agree whether to stop, whether a save is due by time, and whether to stop without a save, one
    step late, so that no process waits for the device or for the others.

    A collective save needs every process to stop (and save) at the same step. The votes are facts of the host (a
    signal, the clock, a failed write), so they travel between hosts over a gloo group of their own, never through
    the device: an all-reduce over the GPUs would make the host wait for the device's queued work before it could
    read the result. Each step's votes are all-reduced in the background and read at the next step, when they have
    long arrived; every process reads the same sums at the same step. `group`: None for a single process, which
    decides at once."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.pending: tuple[np.ndarray, dist.Work] | None = None

    @classmethod
    def between(cls, num_processes: int, timeout_s: float) -> "StopVote":
        """The vote of `num_processes` processes (every one of them must call this: the group is made together)."""
        if num_processes == 1:
            return cls(None)
        return cls(dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))

    def decide(self, stop: bool, save_due: bool = False, abort: bool = False) -> tuple[bool, bool, bool]:
        """Whether to stop after this step, whether to save, and whether to stop without saving: each true when
        any process votes so. With several processes, the votes cast now count at the next call."""
        if self.group is None:
            return stop, save_due, abort
        agreed = (False, False, False)
        if self.pending is not None:
            sums, reduction = self.pending
            reduction.wait()
            agreed = (bool(sums[0]), bool(sums[1]), bool(sums[2]))
        votes = np.array([stop, save_due, abort], dtype=np.int32)
        # A view of the numpy array: read above as host memory, with no tensor method that could wait for a device.
        reduction = dist.all_reduce(torch.from_numpy(votes), group=self.group, async_op=True)
        self.pending = (votes, reduction)
        return agreed


def lost_another_process(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process of the run is gone (killed, or its
    machine lost): NCCL reports it as a DistError, gloo as a plain RuntimeError that names it."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))


def collective_failure(error: BaseException) -> str:
    """A failed collective's reason, without the source location and advice gloo wraps around it."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(error).split()))
    return text.split(". ")[0][:200]


class TrainingDiverged(Exception):
    """The loss or the gradient norm became NaN or infinite; nothing of it was saved. One line."""

    @classmethod
    def at(cls, step: int, first_non_finite: int | None, last_saved_step: int,
           last_saved_name: str | None) -> "TrainingDiverged":
        """Seen at logging step `step` (first_non_finite: the step it began, when the gradient norm tells)."""
        since = f"step {first_non_finite}" if first_non_finite is not None else f"the steps logged at step {step}"
        keep = (f"the newest good checkpoint is {last_saved_name}: resume it (--resume latest) with a lower "
                "learning_rate or max_grad_norm" if last_saved_name is not None else "no checkpoint was saved yet")
        return cls(f"training diverged: the loss or the gradient norm is NaN or infinite since {since} (seen at "
                   f"step {step}); nothing after step {last_saved_step} was saved; {keep}")


class StepAgreement:
    """What every process agrees on after a step (StopVote's votes, read one step late with several): to stop,
    to save by time, or to stop without a save. A timed save agreed on during a validation waits for its end."""

    def __init__(self, accelerator: Accelerator, stop: "StopRequest", time_due: Callable[[], bool],
                 timeout_s: float) -> None:
        self.vote = StopVote.between(accelerator.num_processes, timeout_s)
        self.stop = stop
        self.time_due = time_due
        self.stop_now = self.timed_save = self.abort = False

    def update(self) -> bool:
        """Casts this process's votes and reads the agreed ones; True once every process stops."""
        stop, save, abort = self.vote.decide(self.stop.requested, self.time_due(), self.stop.abort)
        self.stop_now, self.timed_save, self.abort = self.stop_now or stop, self.timed_save or save, self.abort or abort
        return self.stop_now


def exit_code_after(error: BaseException) -> int | None:
    """The exit code of a run that `error` ended, its one line printed (none where another process prints it);
    None for an error nobody foresaw, to be raised again with its traceback."""
    if isinstance(error, (ConfigError, DataError, CheckpointError, ExportError)):
        print(f"error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, AlreadyReported):
        return 2
    if isinstance(error, torch.OutOfMemoryError):
        detail = ". ".join(" ".join(str(error).split()).split(". ")[:2])  # "CUDA out of memory. Tried to allocate X"
        print(f"error: out of GPU memory ({detail}); use a smaller per_device_train_batch_size (global_batch_size "
              'keeps the batch), "activation_checkpointing": true, or per_device_train_batch_size "auto"',
              file=sys.stderr)
        return 2
    if isinstance(error, TrainingDiverged):
        print(f"error: {error}", file=sys.stderr)
        return 3
    if lost_another_process(error):
        # The launcher stops this process next, and says which one failed; their own error line says why.
        print(f"error: lost another process of this run ({collective_failure(error)}): it stopped or its machine "
              "went away; resume from the newest checkpoint (--resume latest)", file=sys.stderr)
        return 1
    if isinstance(error, KeyboardInterrupt):  # during start-up; once training runs, Ctrl+C saves a checkpoint instead
        print("\ninterrupted before training started: nothing to save", file=sys.stderr)
        return 130
    return None


class StopRequest:
    """First Ctrl+C, SIGTERM or SIGHUP (a closed ssh session; torchrun passes it on): ask the loop to finish its
    step (or validation batch), save and exit with the shell's code for the signal. Second Ctrl+C: exit now. Once
    training is over (draining), the first signal ends the wait for the uploads instead.

    Under a launcher (torchrun, accelerate launch: `launcher_pid`), the launcher's death asks the same: the
    workers it leaves behind would otherwise train on unseen, racing the user's next run in the same folder.
    """

    def __init__(self, launcher_pid: int | None = None) -> None:
        self.signal_number: int | None = None
        self.failure: str | None = None
        """Why the run itself asked to stop (its logs cannot be written, a checkpoint write failed): reported at
        the end, once what can be saved is."""
        self.abort = False
        """Stop without saving (the checkpoint writes are what failed)."""
        self.draining = False
        """Training is over: a first signal now cuts the wait for the uploads short (wait_cut_short)."""
        self.wait_cut_short = False
        self.launcher_pid = launcher_pid
        self.launcher_gone = False

    def install(self) -> None:
        for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signal_number, self._handle)

    def _handle(self, signal_number: int, _frame: Any) -> None:
        if self.signal_number is not None:
            if signal_number == signal.SIGINT:
                print("\nSecond interrupt: exiting now without saving.", file=sys.stderr, flush=True)
                raise SystemExit(130)
            return  # already stopping (a launcher passing on another signal, say): the first one's exit code
        self.signal_number = signal_number
        name = signal.Signals(signal_number).name
        if self.draining:
            self.wait_cut_short = True
            print(f"\n{name} received: no more waiting for the uploads (they stay recorded for the next run).",
                  file=sys.stderr, flush=True)
            return
        print(f"\n{name} received: finishing this step, then saving a checkpoint (Ctrl+C again to exit at once).",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        if self.launcher_pid is not None and not self.launcher_gone and os.getppid() != self.launcher_pid:
            self.launcher_gone = True  # this process was handed to another parent: the launcher died
            print(f"\nThe launcher (pid {self.launcher_pid}) is gone: finishing this step, then saving a checkpoint.",
                  file=sys.stderr, flush=True)
        return self.signal_number is not None or self.launcher_gone or self.failure is not None

    def fail(self, reason: str, save: bool = True) -> None:
        """Stop (and save, unless `save` is False), as for a signal, then exit 1 with `reason`."""
        if self.failure is None:
            self.failure, self.abort = reason, not save
            then = "then saving a checkpoint" if save else "then stopping without a save"
            print(f"\n{reason}: finishing this step, {then}.", file=sys.stderr, flush=True)

    def final_exit_code(self, trained: int, log_failure: str | None, last_saved: str | None) -> int:
        """The code a run ends with once it has stopped and waited for its writes and uploads (`trained`: what the
        loop returned): a failure of the run's own wins, said now in one line naming the newest checkpoint, then a
        signal, then how the loop ended."""
        failure = self.failure or log_failure
        if failure is not None:
            saved = f"; saved {last_saved}" if last_saved else ""
            print(f"error: {failure}{saved}", file=sys.stderr)
            return 1
        return self.exit_code if self.signal_number is not None else trained

    @property
    def exit_code(self) -> int:
        """The shell's convention (130 for Ctrl+C, 143 for SIGTERM, 129 for SIGHUP); 1 when another process was
        signalled, the launcher is gone, or the run failed."""
        return 128 + self.signal_number if self.signal_number is not None else 1  # launcher gone, or a failure
