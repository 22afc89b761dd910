#!/usr/bin/env python3
"""Pre-train a GPT-NeoX model on .npz token shards.

    python train.py --config tiny                 # CPU smoke run on the sample data
    python train.py --config production --resume latest

The story of a run: config -> accelerator -> model -> data -> optimizer and schedule -> resume ->
loop -> final checkpoint -> uploads. Each part is a module of its own under configs/ and utils/.
"""
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.distributed.tensor import DTensor
from tqdm.contrib.logging import logging_redirect_tqdm

from configs.command_line import config_from_args, parse_args, resolved_config_json
from configs.training_config import TrainingConfig
from utils.accelerator import (
    enable_activation_checkpointing,
    first_process_decides,
    keep_logits_in_low_precision,
    make_accelerator,
    use_fused_adamw,
)
from utils.checkpoint_utils import Checkpointer
from utils.checkpoints.export import check_export_target, export_checkpoint
from utils.checkpoints.folders import list_checkpoints
from utils.data.evaluation import Evaluator
from utils.data.loader import BatchLoader
from utils.data_utils import RunData, open_data
from utils.errors import DataError, ShardUnavailableError
from utils.model import build_model
from utils.performance import check_memory, choose_micro_batch, make_mfu_meter, smaller_micro_batch
from utils.run_log import MetricsWindow, RunLog
from utils.stopping import StepAgreement, StopRequest, TrainingDiverged, exit_code_after
from utils.train_state import TrainingMetrics, TrainState
from utils.training_utils import grads_to_none, make_optimizer

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    # torchrun (and accelerate launch) marks its workers with TORCHELASTIC_RUN_ID; their parent is the launcher.
    # Taken first: if the launcher dies during start-up (a long resume download), its death still shows.
    launcher_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise here
    try:
        config = config_from_args(args)
        if args.print_config:
            print(resolved_config_json(config))
            return 0
        accelerator = make_accelerator(config)
        with logging_redirect_tqdm():
            return train(config, accelerator, args.resume, launcher_pid)
    except (Exception, KeyboardInterrupt) as error:
        exit_code = exit_code_after(error)  # one line for what a user can act on; a bug keeps its traceback
        if exit_code is None:
            raise
        return exit_code
    finally:
        # A process group left for the interpreter's exit aborts the process (gloo: "terminate called without an
        # active exception"), which would replace the exit code a launcher passes on.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class Run:
    """What the training loop works with, built once by train()."""

    config: TrainingConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any  # Accelerate's wrappers of the AdamW optimizer and its schedule
    scheduler: Any
    evaluator: Evaluator | None
    checkpointer: Checkpointer
    log: RunLog
    accumulation: int
    """Micro-batches per optimizer step on each process: the global batch's share."""
    tokens_per_step: int


def train(config: TrainingConfig, accelerator: Accelerator, resume: str | None, launcher_pid: int | None) -> int:
    chosen_micro_batch = config.per_device_train_batch_size == "auto"
    if chosen_micro_batch:  # from here on, the micro-batch this machine fits
        micro_batch, line = choose_micro_batch(config, accelerator.device, accelerator.num_processes)
        config = replace(config, per_device_train_batch_size=micro_batch)
        if accelerator.is_main_process:
            log.info(line)
    run, data, state = set_up(config, accelerator, resume)
    stop = StopRequest(launcher_pid)
    stop.install()
    training, trained = state.step < config.max_steps, 0
    try:
        if training:
            run, trained = fit_in_memory(run, data, state, stop, may_retry=chosen_micro_batch)
        elif accelerator.is_main_process:  # nothing to train; uploads an earlier run left unfinished still happen
            log.info(f"Nothing to train: step {state.step} has reached max_steps {config.max_steps}")
    finally:
        # At the end, on Ctrl+C, SIGTERM or an error alike: the last save is queued.
        uploads_left = wait_for_writes_and_uploads(run, stop)
    exit_code = stop.final_exit_code(trained, run.log.failure, run.checkpointer.last_saved_name)

    # --- export ----------------------------------------------------------------------------------
    if exit_code == 0 and training and config.export_hf_dir is not None and accelerator.is_main_process:
        final = list_checkpoints(config.checkpoint_dir)[-1]
        exported = export_checkpoint(final.path, Path(config.export_hf_dir), config.export_dtype, overwrite=True)
        log.info(f"Exported {final.name} ({exported.dtype}) as a Hugging Face model to {exported.out_dir}")
    return 1 if exit_code == 0 and uploads_left else exit_code  # done, but some checkpoints exist only here


def wait_for_writes_and_uploads(run: Run, stop: StopRequest) -> list[str]:
    """The checkpoint being written, the uploads (up to upload_timeout_s, or until a signal), the trackers, the
    logs' copy at the destination; returns the checkpoints whose upload is not verified."""
    stop.draining = True
    uploads_left = run.checkpointer.finish(interrupted=lambda: stop.wait_cut_short)
    run.log.end()
    run.checkpointer.push_logs(interrupted=lambda: stop.wait_cut_short)
    return uploads_left


def set_up(config: TrainingConfig, accelerator: Accelerator, resume: str | None) -> tuple[Run, RunData, TrainState]:
    """Everything the loop needs, in the order that fails fastest: folders, resume choice, model, data,
    optimizer, the resumed state."""
    shape = config.model_shape()
    accumulation = config.accumulation(accelerator.num_processes)  # the global batch, shared by these processes
    if config.memory_preflight:  # stop at once, with advice, rather than run out of memory later
        check_memory(config, accelerator.device, accelerator.num_processes)
    checkpointer = Checkpointer.open(config, shape, accelerator, resume)

    # --- model -----------------------------------------------------------------------------------
    set_seed(config.seed)
    model = build_model(shape, config.init, accelerator.device)  # a resumed run loads its weights below
    n_params = sum(p.numel() for p in model.parameters())
    if config.activation_checkpointing and not config.fsdp:  # under FSDP, its plugin checkpoints each layer
        enable_activation_checkpointing(model)

    # --- data ------------------------------------------------------------------------------------
    data = open_data(config, shape, accelerator, checkpointer.resumed_data_state())
    if config.export_hf_dir is not None:  # found out now, not after hours of training
        check_export_target(Path(config.export_hf_dir), overwrite=True)

    # --- optimizer and schedule, then the resumed state ------------------------------------------
    optimizer, scheduler = make_optimizer(model, config, fused=use_fused_adamw(config.fused_adamw, accelerator))
    model, prepared_optimizer, prepared_scheduler = accelerator.prepare(model, optimizer, scheduler)
    keep_logits_in_low_precision(model, accelerator)
    state = TrainState(data.spec, TrainingMetrics(history_length=config.loss_history_length,
                                                  best_from_validation=data.evaluator is not None))
    checkpointer.restore(state, optimizer, scheduler)

    tokens_per_step = config.global_batch(accelerator.num_processes) * shape.seq_len
    mfu_meter = make_mfu_meter(shape, accelerator.device, accelerator.num_processes, config.peak_tflops)
    run_log = RunLog(accelerator, config, mfu_meter, accumulation, tokens_per_step)
    run_log.describe_start(shape, n_params, data.describe(tokens_per_step))
    first_process_decides(accelerator, lambda: run_log.start_trackers(state.step, shape, checkpointer.run_id))
    checkpointer.start(run_log.event, (model, prepared_optimizer, prepared_scheduler), data.tokenizer)
    return (Run(config, accelerator, model, prepared_optimizer, prepared_scheduler, data.evaluator, checkpointer,
                run_log, accumulation, tokens_per_step), data, state)


def fit(run: Run, loader: BatchLoader, state: TrainState, stop: StopRequest) -> int:
    """Trains from `state` to max_steps, or until a stop is requested (returns its exit code)."""
    config, accelerator = run.config, run.accelerator
    run.log.start_progress(config.max_steps, state.step)
    window = MetricsWindow(accelerator.device)
    # Every process must stop (and save) at the same step, or a collective save would hang.
    agreed = StepAgreement(accelerator, stop, run.checkpointer.time_due, config.process_group_timeout_s)
    try:
        while state.step < config.max_steps:
            train_step(run, loader, state, window)
            run.log.step_done()
            report_failures(run, stop)
            agreed.update()
            if agreed.abort:  # a checkpoint write failed: stop, without a save that would fail the same way
                return stop.exit_code
            if state.step % config.logging_steps == 0 or save_due(run, state, agreed):
                log_and_check(run, state, window)  # the only place the loop waits for the device
            validating = run.evaluator is not None and (state.step % config.eval_steps == 0
                                                        or state.step == config.max_steps)
            if validating and accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # the step's queued work belongs to training time, not to the pause
            pause_start = time.perf_counter()  # validation and saving are left out of tokens/s and MFU
            if validating:  # on the held-out batches, before a save so the checkpoint records it
                # A stop agreed between batches ends it (the checkpoint records no half validation).
                result = run.evaluator.evaluate(run.model, accelerator, agreed.update)
                if result is not None:
                    state.metrics.record_validation(state.step, result.as_record())
                    run.log.validation(state.step, result.as_record())
            if save_due(run, state, agreed):  # again: a stop or a timed save may be agreed during validation
                save_checked(run, state, window,
                             run.checkpointer.save_reason(state.step, agreed.stop_now, agreed.timed_save))
                agreed.timed_save = False
            window.pause(time.perf_counter() - pause_start)
            if agreed.stop_now:
                return stop.exit_code
    except DataError as error:
        # The last completed step is consistent: save it so no progress is lost. A bad shard stops every
        # process at the same micro-batch (they all walk the same stream), so they save together. A shard
        # one process could not fetch stops that one alone: a collective save would wait forever for the
        # others, so it exits without saving and the launcher stops the rest (the last checkpoint stands).
        alone = isinstance(error, ShardUnavailableError) and accelerator.num_processes > 1
        if state.step > run.checkpointer.last_saved_step and not alone:
            save_checked(run, state, window, "data error")
        raise
    finally:
        run.log.close()
    return 0


def fit_in_memory(run: Run, data: RunData, state: TrainState, stop: StopRequest, may_retry: bool) -> tuple[Run, int]:
    """fit() from the state's position, with the Run it trained with. When the first step runs out of GPU memory
    at a micro-batch train.py chose ("auto", from an estimate), once more at the next smaller one that shares the
    global batch (accumulation absorbs it), as Composer's automatic micro-batching does. On one process only: on
    several, one that ran out would leave the others waiting in a collective."""
    first_step = state.step
    loader = data.loader(state.position, run.accelerator, run.config.per_device_train_batch_size)
    try:
        return run, fit(run, loader, state, stop)
    except torch.OutOfMemoryError:
        smaller = smaller_micro_batch(run.config, run.accelerator.num_processes)
        if not may_retry or state.step != first_step or run.accelerator.num_processes > 1 or smaller is None:
            raise
    finally:
        loader.close()
    # Nothing was updated: the first step's gradients go, and the step is taken again from the same samples.
    run.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    failed = run.config.per_device_train_batch_size
    config = replace(run.config, per_device_train_batch_size=smaller)
    run = replace(run, config=config, accumulation=config.accumulation(run.accelerator.num_processes))
    run.log.accumulation = run.accumulation
    log.warning(f"⚠️  Out of GPU memory in the first step at micro-batch {failed} (per_device_train_batch_size "
                f"\"auto\"): trying micro-batch {smaller}, {run.accumulation} a step (the global batch stays)")
    loader = data.loader(state.position, run.accelerator, smaller)
    try:
        return run, fit(run, loader, state, stop)
    finally:
        loader.close()


def report_failures(run: Run, stop: StopRequest) -> None:
    """What the run cannot go on with: logs that cannot be written (a full log disk: save while the checkpoint
    disk has room), or a checkpoint's background write that failed (stop without saving)."""
    if run.log.failure is not None:
        stop.fail(run.log.failure)
    failed_write = run.checkpointer.write_failure()
    if failed_write is not None:
        stop.fail(failed_write, save=False)


def save_due(run: Run, state: TrainState, agreed: StepAgreement) -> bool:
    """Whether this step ends with a save, as every process agrees."""
    return not agreed.abort and run.checkpointer.should_save(state.step, agreed.stop_now, agreed.timed_save)


def save_checked(run: Run, state: TrainState, window: MetricsWindow, reason: str) -> None:
    """Saves `state` once the steps since the last logging step are known to be finite."""
    if window.steps:
        log_and_check(run, state, window)
    run.checkpointer.save(state, reason)


def log_and_check(run: Run, state: TrainState, window: MetricsWindow) -> None:
    """The metrics line of the window's steps; raises TrainingDiverged if their loss or a gradient norm was NaN
    or infinite. Before any save: a NaN never reaches a checkpoint, and the good ones are not pruned."""
    record, first_non_finite = run.log.close_window(window, state)
    run.log.training(record)
    if first_non_finite is not None or not math.isfinite(record["loss"]):
        raise TrainingDiverged.at(state.step, first_non_finite, run.checkpointer.last_saved_step,
                                  run.checkpointer.last_saved_name)


def train_step(run: Run, loader: BatchLoader, state: TrainState, window: MetricsWindow) -> None:
    """One optimizer step: forward and backward over the accumulated micro-batches, clip, update; noted in
    `window` once complete (a step cut short by a data error is trained again after a resume)."""
    accelerator, model, accumulation = run.accelerator, run.model, run.accumulation
    losses = []
    for micro_step in range(accumulation):
        batch = next(loader)
        input_ids = batch.input_ids.to(accelerator.device, non_blocking=True)
        # DDP all-reduces gradients only on the last micro-batch of the step. FSDP reduce-scatters every
        # micro-batch: skipping it would keep whole unsharded gradients, summed in bf16.
        sync = micro_step == accumulation - 1 or run.config.fsdp
        with nullcontext() if sync else accelerator.no_sync(model):
            loss = model(input_ids=input_ids, labels=input_ids).loss
            accelerator.backward(loss / accumulation)
        losses.append(loss.detach())
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.config.max_grad_norm or math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm over all shards, as a plain tensor (no host sync)
        grad_norm = grad_norm.full_tensor()
    lr = run.optimizer.param_groups[0]["lr"]  # this step's rate (scheduler.step() sets the next one's)
    run.optimizer.step()
    updated = not accelerator.optimizer_step_was_skipped
    if updated:  # fp16 overflow: no update, so the schedule waits too
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=grads_to_none(accelerator.distributed_type, accumulation))
    state.advance(batch.position, run.tokens_per_step)
    # A NaN or inf gradient norm on an update that the loss scaler did not skip: diverged.
    window.step_done(losses, lr, grad_norm, state.step, updated)


if __name__ == "__main__":
    sys.exit(main())
