#!/usr/bin/env python3
"""Pre-train a GPT-NeoX model on .npz token shards.

    python train.py --config tiny                 # CPU smoke run on the sample data
    python train.py --config production --resume latest

The story of a run: config -> accelerator -> model -> data -> optimizer and schedule -> resume ->
loop -> final checkpoint. Each step is in a module of its own under configs/ and utils/.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import GPTNeoXForCausalLM

from configs.model_config import build_model_config, shape_as_dict
from configs.training_config import ConfigError, TrainingConfig, load_config
from scripts.export_hf import ExportError, check_export_target, export_checkpoint
from utils.checkpoint_utils import (CheckpointError, build_metadata, check_writable_folder, checkpoint_name,
                                    list_checkpoints, load_state, lock_for_this_run, read_json, remove_incomplete_saves,
                                    save_checkpoint, shares_checkpoint_disk, system_info)
from utils.data_utils import (BatchLoader, DataError, DataPosition, ShardUnavailableError, StreamSpec, data_state,
                              position_from_state, select_shards)
from utils.evaluation import Evaluator, read_validation_batches, split_validation
from utils.performance import (MfuMeter, StopVote, check_memory, describe_fast_path, dynamo_plugin,
                               enable_activation_checkpointing, enable_tf32, fsdp_plugin, keep_logits_in_low_precision,
                               make_mfu_meter, use_compile, window_peak_memory_gib)
from utils.shard_cache import open_shard_source
from utils.storage import ObjectInfo, Storage, is_gcs_url
from utils.training_utils import (StopRequest, TrainingMetrics, apply_optimizer_settings, first_process_decides,
                                  lr_multiplier, parameter_groups)
from utils.uploader import (Uploader, check_fresh_destination, check_no_newer_at_destination, fetch_for_resume,
                            locate_checkpoint, open_destination, prune_without_uploads, uploader_for_run)

REPO_ROOT = Path(__file__).resolve().parent
log = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pre-train GPT-NeoX on .npz token shards, with full-state checkpoints and exact resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="test",
                        help="test, production, tiny (configs/NAME.json) or the path of a JSON config")
    parser.add_argument("--max-steps", type=int, help="override max_steps (optimizer steps)")
    parser.add_argument("--resume", metavar="NAME|latest",
                        help="continue from a checkpoint in checkpoint_dir: its folder name, or 'latest'")
    parser.add_argument("--data", help="override where the tokenized_*.npz shards are: a folder or gs://BUCKET[/PREFIX]")
    parser.add_argument("--gcs-credentials", metavar="KEY.json",
                        help="service-account key for gs:// data; without it, Application Default Credentials "
                             "are used, else anonymous access")
    parser.add_argument("--checkpoint-dir", help="override where checkpoints are written")
    parser.add_argument("--upload-destination", metavar="gs://BUCKET/PREFIX|DIR|none",
                        help="override where checkpoints are uploaded; 'none' uploads nothing")
    parser.add_argument("--log-dir", help="override where metrics.jsonl and TensorBoard events go")
    parser.add_argument("--no-background-upload", action="store_true",
                        help="upload checkpoints synchronously (blocks training while uploading)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense bf16 peak in TFLOP/s for MFU; unset, it is looked up by GPU name")
    parser.add_argument("--skip-preflight", action="store_true",
                        help="do not stop when the memory estimate says the run will not fit")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    def from_here(path: str | None) -> str | None:
        """A path typed on the command line is relative to where the command runs, as in any shell tool."""
        return path if path is None or is_gcs_url(path) else str(Path(path).absolute())

    overrides: dict[str, Any] = {"max_steps": args.max_steps, "data": from_here(args.data),
                                 "checkpoint_dir": from_here(args.checkpoint_dir), "log_dir": from_here(args.log_dir),
                                 "gcs_credentials": from_here(args.gcs_credentials)}
    if args.upload_destination not in (None, "none"):
        overrides["upload_destination"] = from_here(args.upload_destination)
    if args.no_background_upload:
        overrides["background_upload"] = False
    if args.skip_preflight:
        overrides["memory_preflight"] = False
    overrides["peak_tflops"] = args.peak_tflops
    config = load_config(args.config, overrides)
    if args.upload_destination == "none":
        config.upload_destination = None
    # Relative paths in a config file are relative to the repo, wherever the command is run from.
    for name in ("data", "checkpoint_dir", "log_dir", "cache_dir"):
        if not is_gcs_url(getattr(config, name)):
            setattr(config, name, str(REPO_ROOT / getattr(config, name)))
    for name in ("eval_data", "tokenizer", "export_hf_dir"):  # optional paths
        if getattr(config, name) is not None and not is_gcs_url(getattr(config, name)):
            setattr(config, name, str(REPO_ROOT / getattr(config, name)))
    if config.upload_destination is not None and not is_gcs_url(config.upload_destination):
        config.upload_destination = str(REPO_ROOT / config.upload_destination)
    return config


def make_accelerator(config: TrainingConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = config.mixed_precision
    if precision == "auto":
        # Emulated bf16 (V100, T4: no bf16 tensor cores) would run many times slower than fp16 there.
        precision = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "no"
    if config.fsdp and not cuda:
        raise ConfigError("fsdp needs CUDA GPUs, and none is visible")
    if cuda:
        enable_tf32()
    accelerator = Accelerator(
        cpu=not cuda,  # CPU processes under a launcher then join one gloo group instead of each being rank 0
        mixed_precision=precision,
        # Our schedule is a function of the optimizer step; Accelerate would otherwise step it once
        # per process per step, running the schedule N times too fast on N processes.
        step_scheduler_with_optimizer=False,
        log_with="tensorboard",
        project_dir=config.log_dir,
        # prepare() compiles the model after wrapping it, so checkpoints keep the plain parameter names.
        dynamo_plugin=dynamo_plugin(use_compile(config.compile, cuda), config.fsdp),
        fsdp_plugin=fsdp_plugin(config.activation_checkpointing, precision) if config.fsdp else None,
        # Gradients live in DDP's all-reduce buckets instead of beside them: 4 bytes per parameter less.
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )
    check_process_group(accelerator.num_processes)
    if config.fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise ConfigError("fsdp is set but Accelerate did not enable FSDP; launch on several GPUs with "
                          "`bash run.sh CONFIG` or `accelerate launch`")
    return accelerator


def check_process_group(seen_processes: int) -> None:
    """Refuses a launch whose processes did not join one group: each would train alone as rank 0 and
    write the same checkpoints."""
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_processes != seen_processes:
        raise ConfigError(f"launched as {launched_processes} processes but Accelerate sees {seen_processes}; "
                          "each would train alone and overwrite the others' checkpoints")


def claim_output_folders(config: TrainingConfig) -> None:
    """On the first process: the output folders can be written, and no other run uses checkpoint_dir."""
    check_writable_folder(config.checkpoint_dir, "checkpoint_dir")
    check_writable_folder(config.log_dir, "log_dir")
    lock_for_this_run(config.checkpoint_dir)  # held until the process exits


def check_resumable(config: TrainingConfig, resume: str | None, remote: Storage | None, accelerator: Accelerator,
                    shares_first_process_disk: bool) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, the same for every process: the first process chooses (the disks of
    several machines may hold different checkpoints) and a machine with a disk of its own downloads it from
    the upload destination. Refuses a fresh start or a resume that would overwrite checkpoints. Returns the
    path, and whether this machine downloaded a copy of its own (deleted once loaded)."""
    choice = first_process_decides(accelerator, lambda: choose_checkpoint(config, resume, remote))
    if choice is None:
        return None, False
    name, remote_object = choice
    path, own_copy = fetch_for_resume(config.checkpoint_dir, name, remote_object, remote, accelerator,
                                      shares_first_process_disk)
    saved_shape = read_json(path / "training_config.json").get("model_shape")
    if saved_shape != shape_as_dict(config.model_shape()):
        raise CheckpointError(f"{name} holds a model of shape {saved_shape}, "
                              f"not this config's {shape_as_dict(config.model_shape())}")
    return path, own_copy


def choose_checkpoint(config: TrainingConfig, resume: str | None,
                      remote: Storage | None) -> tuple[str, ObjectInfo | None] | None:
    """check_resumable's choice, on the first process: the checkpoint's name, and its archive at the
    destination if there is one; None for a fresh start."""
    existing = list_checkpoints(config.checkpoint_dir)
    if resume is None:
        if existing:
            raise CheckpointError(f"{config.checkpoint_dir} already holds checkpoints (newest {existing[-1].name}); "
                                  "pass --resume latest to continue, or set --checkpoint-dir for a new run")
        if remote is not None:
            check_fresh_destination(remote)
        return None
    info, remote_object = locate_checkpoint(config.checkpoint_dir, resume, remote)
    newer = [other.name for other in existing if other.step > info.step]
    if newer:
        raise CheckpointError(f"resuming {info.name} would overwrite newer checkpoints ({', '.join(newer)}); "
                              "move them out of the checkpoint folder first")
    if remote is not None:
        check_no_newer_at_destination(remote, info)
    return info.name, remote_object


def main(argv: list[str] | None = None) -> int:
    # torchrun (and accelerate launch) marks its workers with TORCHELASTIC_RUN_ID; their parent is the launcher.
    # Taken first: if the launcher dies during start-up (a long resume download), its death still shows.
    launcher_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise here
    try:
        config = config_from_args(args)
        accelerator = make_accelerator(config)
        with logging_redirect_tqdm():
            return train(config, accelerator, args.resume, launcher_pid)
    except (ConfigError, DataError, CheckpointError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during start-up; once training runs, Ctrl+C saves a checkpoint instead
        print("\ninterrupted before training started: nothing to save", file=sys.stderr)
        return 130


def train(config: TrainingConfig, accelerator: Accelerator, resume: str | None, launcher_pid: int | None) -> int:
    main_process = accelerator.is_main_process
    shape = config.model_shape()
    if config.memory_preflight:  # stop at once, with advice, rather than run out of memory later
        check_memory(config, accelerator.device, accelerator.num_processes)
    first_process_decides(accelerator, lambda: claim_output_folders(config))
    # Several machines may each have a checkpoint disk of their own, or share one.
    shared_disk = shares_checkpoint_disk(accelerator, config.checkpoint_dir)
    # Checkpoints are uploaded here (and --resume looks here too); the main process uploads.
    remote = open_destination(config.upload_destination, config.gcs_credentials) if config.upload_destination else None
    resume_path, own_resume_copy = check_resumable(config, resume, remote, accelerator, shared_disk)
    if main_process or (accelerator.is_local_main_process and not shared_disk):
        for name in remove_incomplete_saves(config.checkpoint_dir):
            log.info(f"Removed {name}: an incomplete save left by a crash")

    # --- model -----------------------------------------------------------------------------------
    set_seed(config.seed)
    with torch.device(accelerator.device):
        model = GPTNeoXForCausalLM(build_model_config(shape))
    n_params = sum(p.numel() for p in model.parameters())
    if config.activation_checkpointing and not config.fsdp:  # under FSDP, its plugin checkpoints each layer
        enable_activation_checkpointing(model)
    mfu_meter = make_mfu_meter(shape, accelerator.device, accelerator.num_processes, config.peak_tflops)

    # --- data ------------------------------------------------------------------------------------
    source = open_shard_source(config)  # a local folder, or gs:// through a prefetching disk cache
    shards = select_shards(source.list_shards(), config.max_files, config.seed)
    shards, validation = split_validation(config, source, shards)
    spec = StreamSpec(tuple(shards), shape.seq_len, config.seed, shape.vocab_size, shape.eos_token_id,
                      config.pad_token_id, config.shuffle_window_shards)
    # Validation batches are read once and kept, so every validation sees the same ones.
    evaluator = None if validation is None else Evaluator(read_validation_batches(
        validation, spec, config.per_device_train_batch_size, accelerator.process_index, accelerator.num_processes,
        config.eval_batches))
    tokenizer = config.tokenizer_path()  # copied into every checkpoint, so that each is self-contained
    if config.export_hf_dir is not None:  # found out now, not after hours of training
        check_export_target(Path(config.export_hf_dir), overwrite=True)
    tokens_per_step = (config.per_device_train_batch_size * config.gradient_accumulation_steps
                       * accelerator.num_processes * shape.seq_len)

    # --- optimizer and schedule ------------------------------------------------------------------
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                  # Under fp16 the fused kernel is called even on an overflow (it skips inside),
                                  # so Accelerate could not report a skipped step to hold the schedule back.
                                  fused=accelerator.device.type == "cuda" and accelerator.mixed_precision != "fp16")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup_steps=config.warmup_steps, schedule_steps=config.schedule_steps,
        min_lr_ratio=config.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    keep_logits_in_low_precision(model, accelerator)

    # --- resume ----------------------------------------------------------------------------------
    step, position = 0, DataPosition()
    metrics = TrainingMetrics(history_length=config.loss_history_length, best_from_validation=evaluator is not None)
    if resume_path is not None:
        load_state(accelerator, resume_path)
        for change in apply_optimizer_settings(optimizer.optimizer, scheduler.scheduler, config.learning_rate,
                                               (config.adam_beta1, config.adam_beta2), config.adam_epsilon,
                                               config.weight_decay):
            log.info(f"Changed since {resume_path.name}: {change}")
        accelerator.step = 0  # we do our own accumulation; keep Accelerate's micro-step counter neutral
        step = read_json(resume_path / "metadata.json")["step"]
        position = position_from_state(spec, read_json(resume_path / "data_state.json"), resume_path.name)
        metrics.load_state_dict(read_json(resume_path / "training_metrics.json"))
        log.info(f"Resumed from {resume_path.name}: step {step}, epoch {position.epoch}, "
                 f"{position.samples_consumed} samples consumed")
        accelerator.wait_for_everyone()  # all have read it: a machine's own downloaded copy can go
        if own_resume_copy:
            shutil.rmtree(resume_path, ignore_errors=True)

    if main_process:
        log.info(f"Model: GPT-NeoX {config.model_preset}, {n_params:,} parameters, seq {shape.seq_len} | "
                 f"device {accelerator.device} x {accelerator.num_processes} processes, "
                 f"mixed precision {accelerator.mixed_precision}")
        log.info(f"Speed: {describe_fast_path(config, accelerator, mfu_meter)}")
        log.info(f"Data: {len(shards)} shards from {source.description} | {tokens_per_step:,} tokens per step")
        if validation is not None:
            log.info(f"Validation: {len(validation.shards)} held-out shards from {validation.source.description}, "
                     f"{len(evaluator.batches)} batches per process every {config.eval_steps} steps")
        Path(config.log_dir).mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("tensorboard")

    uploader = uploader_for_run(config, remote) if remote is not None and main_process else None
    if step >= config.max_steps:  # nothing to train; uploads an earlier run left unfinished still happen
        log.info(f"Nothing to train: step {step} has reached max_steps {config.max_steps}")
        uploads_left = uploader.finish(config.upload_timeout_s) if uploader is not None else []
        accelerator.end_training()
        return 1 if uploads_left else 0

    uploads_left = []
    loader = BatchLoader(source, spec, config.per_device_train_batch_size, accelerator.process_index,
                         accelerator.num_processes, position, skip_bad_shards=config.skip_bad_shards,
                         prefetch_batches=config.prefetch_batches, prefetch_shards=config.prefetch_shards,
                         pin_memory=accelerator.device.type == "cuda")
    stop = StopRequest(launcher_pid)
    stop.install()
    try:
        exit_code = fit(config, accelerator, model, optimizer, scheduler, loader, spec, step, position, metrics,
                        tokens_per_step, stop, evaluator, tokenizer, uploader, mfu_meter, shared_disk)
    finally:
        loader.close()
        if uploader is not None:  # at the end, on Ctrl+C, SIGTERM or an error alike: the last save is queued
            uploads_left = uploader.finish(config.upload_timeout_s)
        accelerator.end_training()

    # --- export ----------------------------------------------------------------------------------
    if exit_code == 0 and config.export_hf_dir is not None and main_process:
        final = list_checkpoints(config.checkpoint_dir)[-1]
        exported = export_checkpoint(final.path, Path(config.export_hf_dir), config.export_dtype, overwrite=True)
        log.info(f"Exported {final.name} ({exported.dtype}) as a Hugging Face model to {exported.out_dir}")
    if exit_code == 0 and uploads_left:
        exit_code = 1  # training is done, but some checkpoints exist only on this machine
    return exit_code


def fit(config: TrainingConfig, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any,
        loader: BatchLoader, spec: StreamSpec, step: int, position: DataPosition, metrics: TrainingMetrics,
        tokens_per_step: int, stop: StopRequest, evaluator: Evaluator | None, tokenizer: Path | None,
        uploader: Uploader | None, mfu_meter: MfuMeter, shared_disk: bool) -> int:
    main_process = accelerator.is_main_process
    accumulation = config.gradient_accumulation_steps
    ddp = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    metrics_file = Path(config.log_dir) / "metrics.jsonl"
    progress = tqdm(total=config.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                    disable=not main_process)
    # Losses stay on the device until a logging step, so the loop never waits for the GPU in between.
    window_loss = torch.zeros((), device=accelerator.device)
    window_steps, window_start, run_start = 0, time.perf_counter(), time.perf_counter()
    grad_norm = torch.zeros(())
    last_saved_step = step
    stop_vote = StopVote(accelerator)

    def save(reason: str) -> None:
        nonlocal last_saved_step
        metrics.shards_skipped = position.shards_skipped
        files = position.files_consumed(len(spec.shards))
        name = checkpoint_name(position.epoch, step, files)
        if main_process:
            tqdm.write(f"💾 Saving checkpoint at step {step} ({reason})")
        summary = metrics.summary(step)
        save_checkpoint(accelerator, config.checkpoint_dir, name, {
            "training_config.json": {**config.to_dict(), "model_shape": shape_as_dict(config.model_shape())},
            "metadata.json": build_metadata(step, position.epoch, files, metrics.tokens_seen, metrics.state_dict(),
                                            summary, system_info(accelerator)),
            "training_metrics.json": metrics.state_dict(),
            "data_state.json": data_state(spec, position),
        }, copied_files={"tokenizer.json": tokenizer} if tokenizer is not None else None,
            shares_first_process_disk=shared_disk)
        last_saved_step = step
        if main_process:
            tqdm.write(f"✅ Saved {name}")
            if uploader is not None:  # returns at once, unless --no-background-upload
                uploader.submit_new(Path(config.checkpoint_dir) / name)
            # With uploads on, a checkpoint is deleted only once its upload is verified.
            pruned = (uploader.prune(config.keep_checkpoints) if uploader is not None
                      else prune_without_uploads(config.checkpoint_dir, config.keep_checkpoints))
            for deleted in pruned:
                tqdm.write(f"🗑️  Removed old checkpoint {deleted} (keeping the newest {config.keep_checkpoints})")

    try:
        while step < config.max_steps:
            # --- one optimizer step: forward/backward over the accumulated micro-batches ------------
            for micro_step in range(accumulation):
                batch = next(loader)
                input_ids = batch.input_ids.to(accelerator.device, non_blocking=True)
                # DDP all-reduces gradients only on the last micro-batch of the step. FSDP reduce-scatters
                # every micro-batch: skipping it would keep whole unsharded gradients, summed in bf16.
                sync = micro_step == accumulation - 1 or config.fsdp
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss = model(input_ids=input_ids, labels=input_ids).loss
                    accelerator.backward(loss / accumulation)
                window_loss += loss.detach()
                pending_position = batch.position
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
            lr = optimizer.param_groups[0]["lr"]  # this step's rate (scheduler.step() sets the next one's)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, so the schedule waits too
                scheduler.step()
            # Under DDP the gradients are views into its all-reduce buckets: zeroed in place, they stay so.
            # Set to None, the no_sync micro-batches would make a second set beside the buckets.
            optimizer.zero_grad(set_to_none=not ddp)
            step += 1
            window_steps += 1
            position = pending_position
            metrics.tokens_seen += tokens_per_step
            progress.update(1)

            # Every process must stop at the same step, or a collective save would hang.
            stop_now = stop_vote.decide(stop.requested)
            should_save = step % config.save_steps == 0 or step == config.max_steps or stop_now

            # --- log: the only place the loop waits for the device ---------------------------------
            if step % config.logging_steps == 0 or should_save:
                loss_value = (accelerator.reduce(window_loss, reduction="mean") / (window_steps * accumulation)).item()
                elapsed = time.perf_counter() - window_start
                metrics.record(step, loss_value, lr)
                record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_seen": metrics.tokens_seen,
                          "tokens_per_sec": window_steps * tokens_per_step / elapsed,
                          "elapsed_s": time.perf_counter() - run_start, "epoch": position.epoch,
                          "shards_skipped": position.shards_skipped}
                record["mfu"] = mfu_meter.mfu(record["tokens_per_sec"])  # None (null) when the peak is unknown
                record["gpu_memory_gib"] = window_peak_memory_gib(accelerator.device)  # this process's; null on CPU
                if main_process:
                    with open(metrics_file, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
                    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                         tok_s=f"{record['tokens_per_sec']:,.0f}",
                                         **({"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None else {}),
                                         **({"mem": f"{record['gpu_memory_gib']:.1f}G"}
                                            if record["gpu_memory_gib"] is not None else {}))
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            validating = evaluator is not None and (step % config.eval_steps == 0 or step == config.max_steps)
            if validating and accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # the step's queued work belongs to training time, not to the pause
            pause_start = time.perf_counter()  # validation and saving are left out of tokens/s and MFU

            # --- validate: on the held-out batches, before a save so the checkpoint records it ------
            if validating:
                results = evaluator.evaluate(model, accelerator).as_record()
                metrics.record_validation(step, results)
                if main_process:
                    with open(metrics_file, "a") as handle:
                        handle.write(json.dumps({"step": step, **results}) + "\n")
                    accelerator.log(results, step=step)
                    tqdm.write(f"📏 Validation at step {step}: loss {results['eval_loss']:.4f}, "
                               f"perplexity {results['eval_perplexity']:.2f}")

            if should_save:
                save("stop requested" if stop_now else "scheduled")
            window_start += time.perf_counter() - pause_start
            if stop_now:
                return stop.exit_code
    except DataError as error:
        # The last completed step is consistent: save it so no progress is lost. A bad shard stops every
        # process at the same micro-batch (they all walk the same stream), so they save together. A shard
        # one process could not fetch stops that one alone: a collective save would wait forever for the
        # others, so it exits without saving and the launcher stops the rest (the last checkpoint stands).
        alone = isinstance(error, ShardUnavailableError) and accelerator.num_processes > 1
        if step > last_saved_step and not alone:
            save("data error")
        raise
    finally:
        progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
