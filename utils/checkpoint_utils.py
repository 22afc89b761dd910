"""The Checkpointer: every checkpoint of a run, saved and loaded back.

The loop asks should_save(step) and calls save(state, reason); the Checkpointer names the folder, writes
Accelerate's state (model, optimizer, schedule, RNG) and the run's JSON files under .tmp-<name>/, copies
the tokenizer, renames the folder when complete, hands it to the uploader and prunes old checkpoints (one
whose upload is not verified is never deleted). At start, open() claims the run's folders and chooses the checkpoint
to resume (utils/checkpoints/resume.py), and restore() loads it into the Accelerator and the TrainState; at the end,
finish() waits for the uploads. The machinery is in utils/checkpoints/ and utils/uploads/.
"""
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from configs.model_config import ModelShape, shape_as_dict
from configs.training_config import FILES_FORMAT, TrainingConfig
from utils.accelerator import first_process_decides
from utils.checkpoints.export import model_folder_json
from utils.checkpoints.folders import list_checkpoints, remove_incomplete_saves
from utils.checkpoints.ownership import (
    check_sharded_checkpoints_share_a_disk,
    claim_output_folders,
    claim_run,
    shares_checkpoint_disk,
)
from utils.checkpoints.resume import (
    ResumeTarget,
    batch_changes,
    check_resumable,
    resume_target,
    saved_process_count,
    schedule_changes,
)
from utils.checkpoints.untrusted import check_files
from utils.checkpoints.writer import (
    BackgroundWriter,
    HostBuffers,
    ShardedSnapshot,
    ShardedWriter,
    StateSnapshot,
    begin_save,
    finish_save,
    one_line_save_error,
    save_checkpoint,
    write_rng_state,
)
from utils.errors import AlreadyReported, CheckpointError
from utils.files import read_json
from utils.storage.base import Storage
from utils.train_state import TrainState, build_metadata, read_state_files
from utils.training_utils import OPTIMIZER_GROUPS_FILE, apply_optimizer_settings, optimizer_layout
from utils.uploads.destination import open_destination
from utils.uploads.formats import folder_size
from utils.uploads.log_mirror import LogMirror
from utils.uploads.manifest import prune_without_uploads
from utils.uploads.uploader import Uploader, UploadSettings, disk_warning

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
        self.tokenizer: Path | None = None
        """Copied into every checkpoint, so that each is self-contained (given by start())."""
        self.model_folder_json: dict[str, dict] = {}
        """Written into every checkpoint (given by start()): config.json, generation_config.json and
        tokenizer_config.json (not in sharded ones), so that it is a Hugging Face model folder too, and
        optimizer_groups.json, so that stock Accelerate can load it."""
        self.uploader: Uploader | None = None
        self.last_saved_step = 0
        self.last_saved_name: str | None = None
        """The newest checkpoint this run saved or resumed from (its write may still be under way)."""
        self.previous_saved: tuple[int, str | None] = (0, None)
        """last_saved_step and last_saved_name before the save being written (restored if its write fails)."""
        self.last_save_started = time.monotonic()  # the run's start counts as a save for save_every_minutes
        self.timed_vote_cast = False
        """time_due() said so since the last save: the processes' agreement on it is under way."""
        self.report: Callable[[dict[str, Any]], None] | None = None
        """Where each save's figures go (the run log's metrics.jsonl), on the main process."""
        self.snapshot_objects: tuple[torch.nn.Module, Any, Any] | None = None
        """The model, optimizer and schedule an asynchronous save copies; None for synchronous saves."""
        self.buffers = HostBuffers(pin=torch.cuda.is_available())
        self.sharded: ShardedWriter | None = None
        """Under FSDP with async saves: what every process's background write of its shards keeps."""
        self.writer = BackgroundWriter()
        self.logs: LogMirror | None = None
        """Copies log_dir beside the checkpoints at the destination (main process, with uploads on)."""
        self.run_id: str | None = None
        """This run's id (claim()), recorded in every checkpoint's metadata.json."""
        self.resume_from: ResumeTarget | None = None
        """The checkpoint open() chose to resume; None for a fresh start."""

    # --- at start --------------------------------------------------------------------------------
    @classmethod
    def open(cls, config: TrainingConfig, shape: ModelShape, accelerator: Accelerator,
             resume: str | None) -> "Checkpointer":
        """The run's Checkpointer, its folders claimed (writable, locked, not another run's), the checkpoint to
        resume chosen (`resume`: a name, "latest" or "auto"; restore() loads it once the model is built), the logs of
        a resumed run pulled from the destination to a fresh machine, the leftovers of a crash removed. Collective."""
        first_process_decides(accelerator, lambda: claim_output_folders(config))  # writable, locked, readable
        # Several machines may each have a checkpoint disk of their own, or share one.
        shared_disk = shares_checkpoint_disk(accelerator, config.checkpoint_dir)
        if config.fsdp:  # every process writes its shards there
            check_sharded_checkpoints_share_a_disk(accelerator, shared_disk, config.checkpoint_dir)
        # Checkpoints are uploaded here (and --resume looks here too); the main process uploads.
        remote = (open_destination(config.upload_destination, config.gcs_credentials) if config.upload_destination
                  else None)
        checkpointer = cls(config, shape, accelerator, remote, shared_disk)
        checkpointer.resume_from = checkpointer.find_resume(resume)
        checkpointer.claim(checkpointer.resume_from, auto=resume == "auto")
        if checkpointer.resume_from is not None:
            checkpointer.restore_logs()
        checkpointer.remove_incomplete_saves()
        return checkpointer

    def restore(self, state: TrainState, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Loads the checkpoint open() chose into the prepared model, optimizer and schedule and into `state`, then
        the config's learning rate, betas, eps and weight decay into the optimizer (the unprepared ones), saying what
        changed since; nothing for a fresh start."""
        target = self.resume_from
        if target is None:
            return
        self.load(target, state)
        processes = self.accelerator.num_processes
        changes = (schedule_changes(target, self.config) + batch_changes(target, self.config, processes)
                   + apply_optimizer_settings(optimizer, scheduler, self.config))
        if self.accelerator.is_main_process:
            for change in changes:
                log.info(f"Changed since {target.name}: {change}")
            saved_processes = saved_process_count(target)
            if saved_processes not in (None, processes):
                # Only dropout would draw from them (off), and the data order is the seed's, not the processes'.
                log.info(f"{target.name} was saved by {saved_processes} process(es), this run has {processes}: each "
                         "process takes its own RNG state where the checkpoint has one, and nothing the run draws "
                         "depends on them")
            log.info(f"Resumed from {target.name}: step {state.step}, epoch {state.position.epoch}, "
                     f"{state.position.samples_consumed} samples consumed")
        target.release(self.accelerator)

    def resumed_data_state(self) -> dict[str, Any] | None:
        """The data_state.json of the checkpoint to resume (what the data order must continue); None for a fresh
        start. Read before restore() checks the files: it is JSON, and restore() refuses the checkpoint if it lied."""
        if self.resume_from is None:
            return None
        state = read_json(self.resume_from.path / "data_state.json")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.resume_from.path / 'data_state.json'}: not a data state (no JSON object)")
        return state

    def find_resume(self, resume: str | None) -> ResumeTarget | None:
        """The checkpoint every process resumes from (`resume`: a name or "latest"), or None for a fresh start.
        Collective; refusals (a fresh start over checkpoints, a resume that would overwrite newer ones, another
        model shape) are CheckpointErrors, a schedule that would change unasked a ConfigError."""
        target = resume_target(self.config.checkpoint_dir, resume, self.remote, self.accelerator, self.shared_disk)
        if target is not None:
            check_resumable(target, self.config, self.shape, self.accelerator.num_processes)
        return target

    def claim(self, resumed: ResumeTarget | None, auto: bool) -> None:
        """The run's id, its checkpoint and log folders and its upload destination claimed for it (the first
        process decides; another run's folders are refused)."""
        path = resumed.path if resumed is not None else None
        self.run_id = first_process_decides(self.accelerator, lambda: claim_run(self.config, self.remote, path, auto))

    def restore_logs(self) -> None:
        """On a resume with an empty log_dir (a fresh machine): the run's logs from the destination, so that its
        history goes on (the main process)."""
        if self.remote is not None:
            remote = self.remote
            first_process_decides(self.accelerator, lambda: LogMirror(remote, self.config.log_dir,
                                                                      self.config.project_name).pull())

    def push_logs(self, interrupted: Callable[[], bool]) -> None:
        """The logs to the destination, once the run has written its last line (the main process), waiting for
        it no longer than for the uploads, or until interrupted() (a signal): a destination that hangs must not
        hold the exit."""
        if self.logs is None or interrupted():
            return
        pushing = threading.Thread(target=self.logs.push, name="log-mirror", daemon=True)
        pushing.start()
        deadline = time.monotonic() + self.config.upload_timeout_s
        while pushing.is_alive() and time.monotonic() < deadline and not interrupted():
            pushing.join(min(1.0, max(0.0, deadline - time.monotonic())))  # a second at a time, to notice a signal
        if pushing.is_alive():
            cut = "before the signal" if interrupted() else f"within {self.config.upload_timeout_s:g} s"
            log.warning(f"⚠️  The logs were not copied to {self.logs.url} {cut}; the next run with uploads copies them")

    def remove_incomplete_saves(self) -> None:
        """The .tmp- leftovers of a crash, on the disks that hold checkpoints."""
        if self.accelerator.is_main_process or (self.accelerator.is_local_main_process and not self.shared_disk):
            for name in remove_incomplete_saves(self.folder):
                log.info(f"Removed {name}: an incomplete save left by a crash")

    def load(self, target: ResumeTarget, state: TrainState) -> None:
        """Restores the model, optimizer, schedule and RNG (Accelerate) and the train state, once the first
        process has checked every file against the checksums recorded at save time, and that none would run code
        (check_files)."""
        first_process_decides(self.accelerator,
                              lambda: check_files(target.path, self.config.allow_unverified_checkpoints))
        try:
            self.accelerator.load_state(str(target.path))
        except Exception as error:  # truncated or corrupt files raise anything from EOFError to RuntimeError
            detail = " ".join(str(error).split())[:300]
            raise CheckpointError(f"{target.path}: unreadable checkpoint ({type(error).__name__}: {detail}); resume "
                                  "from another one (python scripts/checkpoint_viewer.py list)") from None
        try:
            state.load_state_dict(read_state_files(target.path), target.name)
        except (KeyError, TypeError, ValueError) as error:  # JSON files of the right syntax but not our shape
            raise CheckpointError(f"{target.path}: unreadable train state ({type(error).__name__}: {error})") from None
        self.last_saved_step, self.last_saved_name = state.step, target.name

    def start(self, report: Callable[[dict[str, Any]], None], prepared: tuple[torch.nn.Module, Any, Any],
              tokenizer: Path | None) -> None:
        """Before the first save: where its figures go, asynchronous saves of the prepared model, optimizer and
        schedule (if on), the tokenizer to copy, and the main process's uploader, which first picks up uploads an
        earlier run left unfinished."""
        config = self.config
        self.report, self.tokenizer = report, tokenizer
        # A sharded checkpoint has no model.safetensors for them to go with: export_hf.py makes a model folder.
        self.model_folder_json = {} if config.fsdp else model_folder_json(self.shape, tokenizer)
        model, optimizer, _ = prepared
        if model is not None:
            self.model_folder_json[OPTIMIZER_GROUPS_FILE] = optimizer_layout(
                self.accelerator.unwrap_model(model, keep_torch_compile=False), optimizer)
        if use_async_saves(config.async_save, self.accelerator.device):
            self.snapshot_objects = prepared
            if config.fsdp:  # every process writes its shards
                self.sharded = ShardedWriter(cuda=self.accelerator.device.type == "cuda",
                                             timeout_s=config.process_group_timeout_s)
        if self.accelerator.is_main_process:
            cadence = (f"every {config.save_every_minutes:g} minutes" if config.save_every_minutes is not None
                       else f"every {config.save_steps} steps")
            how = ("asynchronously (the loop waits for a copy into host memory)" if self.snapshot_objects is not None
                   else "synchronously")
            log.info(f"Checkpoints: {cadence} to {self.folder}, written {how}, newest {config.keep_checkpoints} kept")
        if self.remote is None or not self.accelerator.is_main_process:
            return
        mode = UploadSettings.of(config).describe()
        layout = "in the files layout" if config.archive_format == FILES_FORMAT else f"as .{config.archive_format}"
        log.info(f"Uploads: checkpoints go to {self.remote.url} {layout} {mode} ({self.remote.auth})")
        logs = self.logs = LogMirror(self.remote, config.log_dir, config.project_name)

        def uploaded(record: dict[str, Any]) -> None:  # on an upload worker: the logs follow each checkpoint
            report(record)
            logs.push()

        self.uploader = Uploader(self.remote, config.checkpoint_dir, UploadSettings.of(config), report=uploaded)
        self.uploader.submit_pending()

    # --- during training -------------------------------------------------------------------------
    def should_save(self, step: int, stopping: bool, time_due: bool = False) -> bool:
        """Every save_steps steps (or, with save_every_minutes, when the main process's clock says so: time_due,
        which all processes agree on), at the last step, and when the run stops early."""
        cadence = time_due if self.config.save_every_minutes is not None else step % self.config.save_steps == 0
        return cadence or step == self.config.max_steps or stopping

    def save_reason(self, step: int, stopping: bool, time_due: bool) -> str:
        """Why the save should_save() asked for happens, for its log line: "final" at max_steps, "stop requested",
        "timed" (save_every_minutes) or "scheduled" (save_steps)."""
        if step == self.config.max_steps:
            return "final"
        if stopping:
            return "stop requested"
        return "timed" if self.config.save_every_minutes is not None and time_due else "scheduled"

    def time_due(self) -> bool:
        """On the main process: save_every_minutes have passed since the last save began (False elsewhere).
        True once per save: the vote it casts is read a step later, and a second one would ask for a second save."""
        minutes = self.config.save_every_minutes
        due = (minutes is not None and self.accelerator.is_main_process and not self.timed_vote_cast
               and time.monotonic() - self.last_save_started >= minutes * 60)
        self.timed_vote_cast = self.timed_vote_cast or due
        return due

    def write_failure(self) -> str | None:
        """On the main process: why the background write of the last checkpoint failed, once it has (one line;
        the newest good checkpoint is again the one before); None while it writes, or when it succeeded. (Under
        FSDP a failed write fails on every process, torch.distributed.checkpoint's saves being collective: the
        main process says why.)"""
        error = self.writer.failure()
        if error is None:
            return None
        self.last_saved_step, self.last_saved_name = self.previous_saved
        if not self.accelerator.is_main_process:
            return None
        return str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"

    def save(self, state: TrainState, reason: str) -> None:
        """Saves the checkpoint of `state` (every process must call it), then uploads and prunes. With async
        saves the loop waits only for the copy into host memory; the folder appears once written."""
        main_process = self.accelerator.is_main_process
        started = self.last_save_started = time.monotonic()
        self.timed_vote_cast = False
        waited = self.wait_for_write(announce=True)
        name, step = state.checkpoint_name, state.step
        if main_process:
            self.warn_if_the_disk_fills()
            log.info(f"💾 Saving checkpoint at step {step} ({reason})")
        files = self.checkpoint_json(state)  # now: the state moves on while a background write runs
        copied = {"tokenizer.json": self.tokenizer} if self.tokenizer is not None else {}
        if self.snapshot_objects is None:
            final = save_checkpoint(self.accelerator, self.folder, name, files, copied, self.shared_disk)
            blocked = time.monotonic() - started
            if main_process:
                self.saved(final, step, blocked, blocked - waited)
        else:
            tmp, final = begin_save(self.accelerator, self.folder, name)
            half_written = tmp if main_process else None  # removed by the main process when the save fails
            with one_line_save_error(name, self.folder, remove=half_written):
                if main_process or self.shared_disk:  # a disk of this machine's own keeps nothing of a save
                    write_rng_state(self.accelerator, tmp)
                snapshot = self.snapshot(tmp)
            # Every process's RNG file is in: the rest is the main process's (under FSDP, every process's shards).
            self.accelerator.wait_for_everyone()
            if not main_process and not self.shared_disk and self.accelerator.is_local_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # the empty folder begin_save made on a disk of its own
            blocked = time.monotonic() - started
            if snapshot is not None:
                def write() -> None:
                    writing = time.monotonic()
                    with one_line_save_error(name, self.folder, remove=half_written):
                        snapshot.write(tmp)
                        if main_process:
                            finish_save(self.folder, tmp, final, files, copied)
                    if main_process:
                        self.saved(final, step, blocked, time.monotonic() - writing)
                self.writer.start(name, write)
        self.previous_saved = self.last_saved_step, self.last_saved_name
        self.last_saved_step, self.last_saved_name = step, name

    def snapshot(self, tmp: Path) -> StateSnapshot | ShardedSnapshot | None:
        """The state copied into host memory for a background write into `tmp`: the main process's whole state,
        or under FSDP each process's shards (their writes begin at once); None where nothing is written."""
        assert self.snapshot_objects is not None
        if self.sharded is not None:
            return ShardedSnapshot(self.accelerator, self.snapshot_objects, self.sharded, tmp)
        if self.accelerator.is_main_process:
            return StateSnapshot(self.accelerator, self.snapshot_objects, self.buffers)
        return None

    def warn_if_the_disk_fills(self) -> None:
        """Before a save, one line when the disk would not hold it (about the size of the last one) beside the
        checkpoints it keeps: said before a save fails for lack of space, with the way out."""
        saved = list_checkpoints(self.folder)
        if not saved:
            return
        unverified = self.uploader.unverified_checkpoints() if self.uploader is not None else []
        try:
            warning = disk_warning(self.folder, folder_size(saved[-1].path), unverified)
        except OSError:  # the newest checkpoint pruned meanwhile by an upload worker, say: only a warning is lost
            return
        if warning is not None:
            log.warning(warning)

    def wait_for_write(self, announce: bool = False) -> float:
        """Waits for the background write of the previous checkpoint; raises its error, naming the newest good
        checkpoint. Returns the seconds waited."""
        if announce and self.writer.busy and self.accelerator.is_main_process:
            log.info(f"⏳ {self.writer.name} is still being written: waiting for it before the next save")
        try:
            return self.writer.wait()
        except CheckpointError as error:
            self.last_saved_step, self.last_saved_name = self.previous_saved
            if self.sharded is not None and not self.accelerator.is_main_process:
                # A sharded write fails on every process together (its saves are collective): one line, the main
                # process's.
                raise AlreadyReported(str(error)) from error
            saved = f"; saved {self.last_saved_name}" if self.last_saved_name else ""
            raise CheckpointError(f"{error}{saved}") from None

    def saved(self, final: Path, step: int, blocked: float, writing: float) -> None:
        """On the main process, once a checkpoint folder is complete: report it, hand it to the uploader, prune."""
        size = folder_size(final)
        written = f", written in the background in {writing:,.1f} s" if self.snapshot_objects is not None else ""
        # The pause is left out of the tokens/s and MFU the log lines report: said here, so a cadence's cost shows.
        log.info(f"✅ Saved {final.name} (training paused {blocked:,.1f} s for it{written})")
        if self.report is not None:
            self.report({"event": "save", "step": step, "checkpoint": final.name, "bytes": size,
                         "seconds_blocked": round(blocked, 3), "seconds_writing": round(writing, 3),
                         "async": self.snapshot_objects is not None})
        if self.uploader is not None:  # returns at once, unless --no-background-upload
            # The uploader prunes after each verified upload, on its own thread when in the background: the check
            # that a remote copy still exists before a local one goes is a network request.
            self.uploader.submit_new(final)
        else:
            for deleted in prune_without_uploads(self.folder, self.config.keep_checkpoints):
                log.info(f"🗑️  Removed old checkpoint {deleted} (keeping the newest {self.config.keep_checkpoints})")

    def checkpoint_json(self, state: TrainState) -> dict[str, Any]:
        """The JSON files of a checkpoint of `state`, by file name."""
        saved = state.state_dict()
        return {
            "training_config.json": {**self.config.to_dict(), "model_shape": shape_as_dict(self.shape),
                                     "samples_per_step": self.config.global_batch(self.accelerator.num_processes),
                                     "num_processes": self.accelerator.num_processes},
            "metadata.json": {**build_metadata(state.step, state.position.epoch, state.files_consumed,
                                               state.metrics.tokens_seen, saved["metrics"],
                                               state.metrics.summary(state.step), system_info(self.accelerator)),
                              "run_id": self.run_id},
            "training_metrics.json": saved["metrics"],
            "data_state.json": saved["data"],
            **self.model_folder_json,
        }

    # --- at the end ------------------------------------------------------------------------------
    def finish(self, interrupted: Callable[[], bool]) -> list[str]:
        """Waits for the checkpoint being written, then up to upload_timeout_s for the uploads, or until
        interrupted() (a signal during the wait); returns the checkpoints whose upload is not verified. A failed
        background write is raised after the uploads."""
        try:
            self.wait_for_write(announce=False)
        finally:
            if self.sharded is not None:  # no write in flight any more
                self.sharded.close()
                self.sharded = None
            left = (self.uploader.finish(self.config.upload_timeout_s, interrupted) if self.uploader is not None
                    else [])
        return left


def use_async_saves(setting: bool | str, device: torch.device) -> bool:
    """config.async_save: "auto" is on on CUDA."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


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
