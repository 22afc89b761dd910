"""The Checkpointer: every checkpoint of a run, saved and loaded back.

The loop asks should_save(step) and calls save(state, reason); the Checkpointer names the folder, writes
Accelerate's state (model, optimizer, schedule, RNG) and the run's JSON files under .tmp-<name>/, copies
the tokenizer, renames the folder when complete, hands it to the uploader and prunes old checkpoints (one
whose upload is not verified is never deleted). At start, find_resume() chooses the checkpoint to resume
(utils/resume.py) and load() restores it into the Accelerator and the TrainState; at the end, finish()
waits for the uploads.
"""
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from tqdm import tqdm

from configs.model_config import ModelShape, shape_as_dict
from configs.training_config import TrainingConfig
from utils.checkpoint_utils import (TMP_PREFIX, CheckpointError, build_metadata, fsync_dir, fsync_tree,
                                    prune_checkpoints, read_json, remove_incomplete_saves, write_json_atomic)
from utils.manifest import UploadManifest
from utils.resume import ResumeTarget, check_resumable, resume_target
from utils.storage import Storage
from utils.train_state import TrainState
from utils.uploader import Uploader

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and loads the checkpoints of one run in config.checkpoint_dir, uploading them to `remote`.

    shared_disk (shares_checkpoint_disk): False on a machine whose checkpoint_dir is a disk of its own,
    which then keeps nothing of a save (the first process's machine keeps the checkpoint)."""

    def __init__(self, config: TrainingConfig, shape: ModelShape, accelerator: Accelerator, remote: Storage | None,
                 shared_disk: bool) -> None:
        self.config = config
        self.folder = Path(config.checkpoint_dir)
        self.accelerator = accelerator
        self.remote = remote
        self.shared_disk = shared_disk
        self.shape = shape
        self.tokenizer = config.tokenizer_path()  # copied into every checkpoint, so that each is self-contained
        self.uploader: Uploader | None = None
        self.last_saved_step = 0

    # --- at start --------------------------------------------------------------------------------
    def find_resume(self, resume: str | None) -> ResumeTarget | None:
        """The checkpoint every process resumes from (`resume`: a name or "latest"), or None for a fresh start.
        Collective; refusals (a fresh start over checkpoints, a resume that would overwrite newer ones, another
        model shape) are CheckpointErrors, a schedule that would change unasked a ConfigError."""
        target = resume_target(self.config.checkpoint_dir, resume, self.remote, self.accelerator, self.shared_disk)
        if target is not None:
            check_resumable(target, self.config, self.shape)
        return target

    def remove_incomplete_saves(self) -> None:
        """The .tmp- leftovers of a crash, on the disks that hold checkpoints."""
        if self.accelerator.is_main_process or (self.accelerator.is_local_main_process and not self.shared_disk):
            for name in remove_incomplete_saves(self.folder):
                log.info(f"Removed {name}: an incomplete save left by a crash")

    def load(self, target: ResumeTarget, state: TrainState) -> None:
        """Restores the model, optimizer, schedule and RNG (Accelerate) and the train state."""
        try:
            self.accelerator.load_state(str(target.path))
        except Exception as error:  # truncated or corrupt files raise anything from EOFError to RuntimeError
            detail = " ".join(str(error).split())[:300]
            raise CheckpointError(f"{target.path}: unreadable checkpoint ({type(error).__name__}: {detail}); resume "
                                  "from another one (python scripts/checkpoint_viewer.py list)") from None
        state.load_state_dict(read_state_files(target.path), target.name)
        self.last_saved_step = state.step

    def start_uploads(self) -> None:
        """The main process's uploader, which first picks up uploads an earlier run left unfinished."""
        if self.remote is None or not self.accelerator.is_main_process:
            return
        config = self.config
        mode = (f"in the background ({config.upload_workers} worker(s))" if config.background_upload
                else "synchronously")
        log.info(f"Uploads: checkpoints go to {self.remote.url} as .{config.archive_format} {mode} ({self.remote.auth})")
        self.uploader = Uploader(self.remote, config.checkpoint_dir, config.archive_format,
                                 background=config.background_upload, workers=config.upload_workers,
                                 attempts=config.upload_attempts, keep_local=config.keep_checkpoints)
        self.uploader.submit_pending()

    # --- during training -------------------------------------------------------------------------
    def should_save(self, step: int, stopping: bool) -> bool:
        """Every save_steps steps, at the last step, and when the run stops early."""
        return step % self.config.save_steps == 0 or step == self.config.max_steps or stopping

    def save(self, state: TrainState, reason: str) -> Path:
        """Writes the checkpoint of `state` (every process must call it), then uploads and prunes."""
        main_process = self.accelerator.is_main_process
        name = state.checkpoint_name
        if main_process:
            tqdm.write(f"💾 Saving checkpoint at step {state.step} ({reason})")
        final = save_checkpoint(self.accelerator, self.folder, name, self.checkpoint_json(state),
                                copied_files={"tokenizer.json": self.tokenizer} if self.tokenizer is not None else None,
                                shares_first_process_disk=self.shared_disk)
        self.last_saved_step = state.step
        if main_process:
            tqdm.write(f"✅ Saved {name}")
            if self.uploader is not None:  # returns at once, unless --no-background-upload
                self.uploader.submit_new(final)
            for deleted in self.prune():
                tqdm.write(f"🗑️  Removed old checkpoint {deleted} (keeping the newest {self.config.keep_checkpoints})")
        return final

    def checkpoint_json(self, state: TrainState) -> dict[str, Any]:
        """The JSON files of a checkpoint of `state`, by file name."""
        saved = state.state_dict()
        return {
            "training_config.json": {**self.config.to_dict(), "model_shape": shape_as_dict(self.shape)},
            "metadata.json": build_metadata(state.step, state.position.epoch, state.files_consumed,
                                            state.metrics.tokens_seen, saved["metrics"], state.metrics.summary(state.step),
                                            system_info(self.accelerator)),
            "training_metrics.json": saved["metrics"],
            "data_state.json": saved["data"],
        }

    def prune(self) -> list[str]:
        """All but the newest keep_checkpoints; with uploads on, only those whose upload is verified."""
        keep = self.config.keep_checkpoints
        return self.uploader.prune(keep) if self.uploader is not None else prune_without_uploads(self.folder, keep)

    # --- at the end ------------------------------------------------------------------------------
    def finish(self) -> list[str]:
        """Waits up to upload_timeout_s for the uploads; returns the checkpoints whose upload is not verified."""
        return self.uploader.finish(self.config.upload_timeout_s) if self.uploader is not None else []


def read_state_files(checkpoint: Path) -> dict[str, Any]:
    """The TrainState.state_dict() saved in a checkpoint's JSON files."""
    return {"step": read_json(checkpoint / "metadata.json")["step"], "data": read_json(checkpoint / "data_state.json"),
            "metrics": read_json(checkpoint / "training_metrics.json")}


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: str | Path, name: str,
                    json_files: dict[str, Any], copied_files: dict[str, Path] | None = None,
                    shares_first_process_disk: bool = True) -> Path:
    """Saves Accelerate's state, the JSON files and copies of `copied_files` (name in the checkpoint ->
    source, e.g. the run's tokenizer.json) under .tmp-<name>, then renames it to <name>.

    Every process must call it (Accelerate writes each process's RNG state). An existing checkpoint
    of the same name is never overwritten. shares_first_process_disk (shares_checkpoint_disk): False on a
    machine with a disk of its own, which then keeps nothing of the save.
    """
    folder = Path(checkpoint_dir)
    final, tmp = folder / name, folder / f"{TMP_PREFIX}{name}"
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite it")
    try:
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for filename, value in json_files.items():
                write_json_atomic(tmp / filename, value)
            for filename, source in (copied_files or {}).items():
                shutil.copyfile(source, tmp / filename)
            fsync_tree(tmp)
            os.rename(tmp, final)
            fsync_dir(folder)  # the rename itself survives a power loss
    except (OSError, RuntimeError) as error:  # a full disk, say (torch's writer raises RuntimeError): the
        # half-written .tmp- folder is removed at the next start
        raise CheckpointError(f"saving {name} in {folder} failed: {' '.join(str(error).split())[:300]}") from None
    accelerator.wait_for_everyone()
    if (not shares_first_process_disk and accelerator.is_local_main_process
            and accelerator.distributed_type != DistributedType.FSDP):
        # A disk of this machine's own: its DDP processes wrote only their RNG states here, which training
        # does not use (no dropout) and resume does without. (Never on a shared disk, where .tmp-<name> may
        # still resolve, through a client's cache, to the checkpoint just renamed.)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune_without_uploads(checkpoint_dir: str | Path, keep: int) -> list[str]:
    """Retention for a run with no upload_destination: a checkpoint that an earlier run left unuploaded
    (recorded in uploads.json, not verified) may be the only copy upload_manager is still to upload: kept."""
    records = UploadManifest(checkpoint_dir, "").read()
    return prune_checkpoints(checkpoint_dir, keep,
                             lambda info: info.name not in records or records[info.name].state == "uploaded")


def shares_checkpoint_disk(accelerator: Accelerator, checkpoint_dir: str | Path) -> bool:
    """Whether this process sees the files the first process writes in checkpoint_dir: always on one machine;
    on several, only when checkpoint_dir is on a filesystem they share. Collective. The probe's name is new,
    so no client cache of a network filesystem can answer for it."""
    token = [secrets.token_hex(8)]
    broadcast_object_list(token)
    probe = Path(checkpoint_dir) / f".shared-probe-{token[0]}"
    if accelerator.is_main_process:
        probe.write_bytes(b"")
    accelerator.wait_for_everyone()
    shared = probe.exists()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    return shared


def system_info(accelerator: Accelerator) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "torch_version": torch.__version__,
    }
