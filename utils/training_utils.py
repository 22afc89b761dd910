"""Small pieces of the training loop: learning-rate schedule, optimizer groups, agreeing across processes,
stop signals."""
import math
import os
import re
import signal
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from configs.training_config import ConfigError, TrainingConfig
from utils.checkpoint_utils import CheckpointError
from utils.performance import StopVote

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------

def lr_multiplier(step: int, warmup_steps: int, schedule_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak learning rate for optimizer step `step` (0-based): linear warmup, then
    cosine decay to min_lr_ratio at schedule_steps, flat after. It depends on the optimizer step
    only, so a run on N processes follows the same schedule as a run on one."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= schedule_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, schedule_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: not on biases, LayerNorms or the input embedding."""
    input_embedding = model.get_input_embeddings().weight
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim >= 2 and parameter is not input_embedding:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [{"params": params, "weight_decay": decay_of_group}
            for params, decay_of_group in zip((decay, no_decay), group_weight_decays(weight_decay))]


def group_weight_decays(weight_decay: float) -> tuple[float, float]:
    """The weight decay of parameter_groups' two groups: [weight matrices, everything else]."""
    return weight_decay, 0.0


def make_optimizer(model: torch.nn.Module, config: TrainingConfig, fused: bool
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over parameter_groups, and the warmup-cosine schedule as a function of the optimizer step."""
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup_steps=config.warmup_steps, schedule_steps=config.schedule_steps,
        min_lr_ratio=config.min_lr_ratio))
    return optimizer, scheduler


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                             config: TrainingConfig) -> list[str]:
    """After a checkpoint is loaded: the config's peak learning rate, betas, eps and weight decay replace
    those of the run that saved it (loading restores them with the optimizer and schedule state), so a
    resume with a changed config trains with what it says. Returns the changes, one "name: old -> new" each.

    The groups are parameter_groups' [decay, no decay]; the schedule's shape comes from the config anyway.
    """
    learning_rate, betas = config.learning_rate, (config.adam_beta1, config.adam_beta2)
    changes: dict[str, str] = {}
    for group, decay_of_group in zip(optimizer.param_groups, group_weight_decays(config.weight_decay)):
        wanted = {"learning_rate": ("initial_lr", learning_rate), "adam_betas": ("betas", betas),
                  "adam_epsilon": ("eps", config.adam_epsilon), "weight_decay": ("weight_decay", decay_of_group)}
        for name, (key, value) in wanted.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                changes.setdefault(name, f"{name}: {old} -> {value}")
                group[key] = value
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # The rate of the next step, as LambdaLR would have set it had it run with these settings throughout.
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    return list(changes.values())


# ---------------------------------------------------------------------------------------------
# Agreeing
# ---------------------------------------------------------------------------------------------

def first_process_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """decide() runs on the first process only; every process returns its result, or raises: the first process
    its own error, the others a CheckpointError or ConfigError (as it is) or a CheckpointError saying what
    failed. No process is left waiting for a decision that never comes."""
    outcome: list[Any] = [None]
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            outcome[0] = decide()
        except Exception as error:  # noqa: BLE001  (passed on, then raised again below)
            failure = error
            outcome[0] = error if isinstance(error, (CheckpointError, ConfigError)) else CheckpointError(
                f"the first process failed ({type(error).__name__}: {' '.join(str(error).split())[:300]})")
    broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


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


class Consensus:
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


# ---------------------------------------------------------------------------------------------
# Stop signals
# ---------------------------------------------------------------------------------------------

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

    @property
    def exit_code(self) -> int:
        """The shell's convention (130 for Ctrl+C, 143 for SIGTERM, 129 for SIGHUP); 1 when another process was
        signalled, the launcher is gone, or the run failed."""
        return 128 + self.signal_number if self.signal_number is not None else 1  # launcher gone, or a failure
