#!/usr/bin/env python3
"""See and finish checkpoint uploads, with the same uploader code as training.

    python scripts/upload_manager.py status --config test          # local and remote side by side
    python scripts/upload_manager.py list                          # local checkpoints and their upload state
    python scripts/upload_manager.py upload checkpoint-epoch0-step50-files0
    python scripts/upload_manager.py upload checkpoint-epoch0-step50-files0 --force   # even if already verified
    python scripts/upload_manager.py upload-all --config test      # every local checkpoint not yet verified

The checkpoint folder and destination come from the config (checkpoint_dir, upload_destination; relative
to the repository) unless --checkpoint-dir / --destination are given (relative to the current folder); with
--checkpoint-dir alone, the destination is the one recorded in that folder's uploads.json (the tool says so).
The upload state lives in <checkpoint_dir>/uploads.json, shared with a training run that may be running at
the same time; status and list show only the records about the destination in use.

Nothing here imports torch, transformers or accelerate (seconds of start-up): `list` runs in a fraction of one.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.training_config import ARCHIVE_FORMATS, ConfigError, load_config, path_from_here  # noqa: E402
from utils.checkpoints.folders import holders_hint, list_checkpoints, parse_checkpoint_name, subfolders_holding
from utils.display import fmt_bytes
from utils.errors import CheckpointError, UploadError
from utils.storage import is_gcs_url
from utils.storage.base import StorageError
from utils.uploads.destination import checkpoint_bytes, open_destination, remote_checkpoints
from utils.uploads.formats import folder_size, split_archive_name
from utils.uploads.manifest import UploadManifest, UploadRecord, read_snapshot
from utils.uploads.uploader import Uploader, UploadSettings

ALREADY_VERIFIED = "already uploaded and verified"
"""What upload and upload-all say of a checkpoint that uploads.json records as verified at the destination."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="test", help="test, production, tiny or the path of a JSON config")
    common.add_argument("--checkpoint-dir", help="override the config's checkpoint_dir")
    common.add_argument("--destination", help="override the config's upload_destination (gs://... or a folder)")
    common.add_argument("--archive-format", choices=ARCHIVE_FORMATS, help="override the config's archive_format")
    common.add_argument("--gcs-credentials", metavar="KEY.json", help="service-account key for gs:// access")
    parser = argparse.ArgumentParser(description="See and finish checkpoint uploads.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", parents=[common], help="local and remote checkpoints side by side")
    commands.add_parser("list", parents=[common], help="local checkpoints with size and upload state")
    upload = commands.add_parser(
        "upload", parents=[common], help="upload one checkpoint now (verified)",
        description=f"Upload one checkpoint now and verify it. One {ALREADY_VERIFIED} at the destination is "
                    "not uploaded again (the tool says so) unless --force.")
    upload.add_argument("name", help="checkpoint folder name, e.g. checkpoint-epoch0-step50-files0")
    upload.add_argument("--force", action="store_true",
                        help=f"upload it even when uploads.json records it as {ALREADY_VERIFIED}: the record is "
                             "dropped and the checkpoint compared with the destination again (an identical copy "
                             "there is kept and recorded, never overwritten; a missing one is uploaded)")
    commands.add_parser("upload-all", parents=[common], help="upload every local checkpoint not yet verified")
    return parser.parse_args(argv)


class Settings:
    """What the commands need from the config and flags: paths given as flags are relative to the current
    folder, a config's to the repo root (as for train.py)."""

    def __init__(self, args: argparse.Namespace) -> None:
        config = load_config(args.config, {"checkpoint_dir": args.checkpoint_dir,
                                           "upload_destination": path_from_here(args.destination),
                                           "archive_format": args.archive_format,
                                           "gcs_credentials": args.gcs_credentials}).with_repo_paths()
        # --checkpoint-dir as typed: messages name the folder the way the user did.
        self.checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(config.checkpoint_dir)
        destination = config.upload_destination
        self.destination_note: str | None = None
        recorded = read_snapshot(self.checkpoint_dir) if args.checkpoint_dir and not args.destination else None
        if recorded is not None and recorded.destination:
            # That folder's checkpoints went there; the config's default destination may be another run's.
            destination = recorded.destination
            self.destination_note = (f"Destination {destination}: recorded in {self.checkpoint_dir / 'uploads.json'} "
                                     "(pass --destination to choose another)")
        if destination is not None and not is_gcs_url(destination):
            destination = str(Path(destination).resolve())  # as the uploader names it in the records' remote URLs
        self.destination = destination
        self.archive_format = config.archive_format
        self.attempts = config.upload_attempts
        self.streams = config.upload_streams
        self.credentials = config.gcs_credentials

    def uploader(self, check_write: bool = True) -> Uploader:
        """check_write=False for commands that only read the destination (status)."""
        if self.destination is None:
            raise UploadError("the config sets no upload_destination; pass --destination gs://BUCKET/PREFIX or a folder")
        if self.destination_note:
            print(self.destination_note)
        return Uploader(open_destination(self.destination, self.credentials, check_write), self.checkpoint_dir,
                        UploadSettings(self.archive_format, background=False, attempts=self.attempts,
                                       streams=self.streams))

    def require_checkpoint_dir(self) -> None:
        if not self.checkpoint_dir.is_dir():
            raise CheckpointError(f"checkpoint folder {self.checkpoint_dir} does not exist "
                                  "(pass --checkpoint-dir or --config)")


def subfolders_hint(checkpoint_dir: Path) -> str:
    """"; DIR holds some: pass --checkpoint-dir DIR or --config NAME" for the subfolders of an empty checkpoint
    folder that hold checkpoints (checkpoints/tiny after `bash run.sh tiny`, when the default config's
    checkpoints/ is empty), as checkpoint_viewer.py and monitor_training.py name them; "" when none does."""
    try:
        holders = subfolders_holding(checkpoint_dir, lambda sub: bool(list_checkpoints(sub)))
    except OSError:  # an unreadable folder has no subfolders to point at
        return ""
    return f"; {holders_hint(holders, '--checkpoint-dir', 'checkpoint_dir')}" if holders else ""


def records_for(manifest: UploadManifest, destination: str | None) -> dict[str, UploadRecord]:
    """The records of uploads.json about `destination` (all of them when it is None). uploads.json keeps one
    record per checkpoint, whatever the destination of its last upload; a record naming another destination
    says nothing about this one, so it is left out. A record with no remote URL yet (never queued) is kept.
    Reading nothing from a missing folder: the manifest would create it."""
    if not manifest.path.parent.is_dir():
        return {}
    records = manifest.read()
    if destination is None:
        return records
    prefix = destination.rstrip("/") + "/"
    return {name: record for name, record in records.items()
            if record.remote_url is None or record.remote_url.startswith(prefix)}


def other_destination_note(manifest: UploadManifest, destination: str) -> str | None:
    """A warning when uploads.json holds records about another destination than `destination`."""
    if not manifest.path.parent.is_dir():
        return None
    others = len(manifest.read()) - len(records_for(manifest, destination))
    if not others:
        return None
    return (f"note: {others} record(s) in {manifest.path} are about another destination than {destination} "
            "(an upload with another --destination); not shown")


def command_list(settings: Settings) -> int:
    settings.require_checkpoint_dir()
    checkpoints = list_checkpoints(settings.checkpoint_dir)
    manifest = UploadManifest(settings.checkpoint_dir, settings.destination or "")
    records = records_for(manifest, settings.destination)
    if not checkpoints:
        print(f"No checkpoints in {settings.checkpoint_dir}{subfolders_hint(settings.checkpoint_dir)}")
        return 0
    where = f" (upload state for {settings.destination})" if settings.destination else ""
    if settings.destination_note:
        print(settings.destination_note)
    print(f"📁 {len(checkpoints)} checkpoint(s) in {settings.checkpoint_dir}{where}:")
    for index, info in enumerate(checkpoints, 1):
        record = records.get(info.name)
        state = record.state if record else "local"
        print(f"{index:2d}. {info.name:40s} Step: {info.step:<8d} {fmt_bytes(folder_size(info.path)):>10s}  {state}")
    note = other_destination_note(manifest, settings.destination) if settings.destination else None
    if note:
        print(note)
    return 0


def command_status(settings: Settings) -> int:
    uploader = settings.uploader(check_write=False)
    local = {info.name: info for info in list_checkpoints(settings.checkpoint_dir)}
    records = records_for(uploader.manifest, uploader.destination)
    remote = remote_checkpoints(uploader.storage)
    names = sorted({*local, *records, *remote}, key=lambda name: (parse_checkpoint_name(name) or (0, 0, 0))[1:])
    print(f"Local:  {settings.checkpoint_dir}\nRemote: {uploader.destination}")
    print(f"{'CHECKPOINT':40s} {'LOCAL':>10s}  {'STATE':10s} {'REMOTE':>10s}  {'FORMAT':8s} {'CRC32C':10s} NOTE")
    for name in names:
        record = records.get(name)
        state = record.state if record else ("local" if name in local else "remote")
        local_size = fmt_bytes(folder_size(local[name].path)) if name in local else "-"
        obj = remote[name][1] if name in remote else None
        remote_size = fmt_bytes(checkpoint_bytes(uploader.storage, obj)) if obj else "-"
        archive = (split_archive_name(obj.name) or ("", "?"))[1] if obj else "-"
        crc = (record.crc32c if record and record.crc32c else (obj.crc32c if obj else None)) or "-"
        note = ""
        if record and record.state == "failed":
            note = f"{record.attempts} attempt(s): {record.error}"
        elif record and record.state == "uploaded" and obj is None:
            note = "recorded as uploaded, but not found at the destination"
        elif name in local and state != "uploaded" and obj is not None:
            note = "at the destination, not verified from here: upload-all compares and records it"
        elif name in local and state != "uploaded":
            note = "pending: upload-all uploads it"
        print(f"{name:40s} {local_size:>10s}  {state:10s} {remote_size:>10s}  {archive:8s} {crc:10s} {note}")
    note = other_destination_note(uploader.manifest, uploader.destination)
    if note:
        print(note)
    return 0


def command_upload(settings: Settings, names: list[str] | None, force: bool = False) -> int:
    """Uploads `names` (upload), or every local checkpoint (upload-all, names None), skipping those already
    verified at the destination unless `force`."""
    if not settings.checkpoint_dir.is_dir():
        what = f"checkpoint {names[0]!r} not found in" if names else "checkpoint folder"
        raise UploadError(f"{what} {settings.checkpoint_dir}: the folder does not exist "
                          "(pass --checkpoint-dir or --config)")
    # The local side first: nothing to upload needs no network (and no minutes of retries of an unreachable one).
    local = [info.name for info in list_checkpoints(settings.checkpoint_dir)]
    elsewhere = "" if local else subfolders_hint(settings.checkpoint_dir)
    if names is None and not local:
        print(f"No checkpoints to upload in {settings.checkpoint_dir}{elsewhere}")
        return 0
    for name in names or []:
        if name not in local:
            raise UploadError(f"checkpoint {name!r} not found in {settings.checkpoint_dir} "
                              f"(existing: {', '.join(local) or 'none'}){elsewhere}")
    uploader = settings.uploader()
    records = uploader.manifest.read()
    # Only `upload` has --force: upload-all re-uploading every verified checkpoint is never what is meant.
    how_to_force = " (pass --force to upload it again)" if names is not None else ""
    requested = names if names is not None else local
    skipped = [] if force else [name for name in requested if uploader.is_verified(name, records)]
    names = [name for name in requested if name not in skipped]
    for name in skipped:
        print(f"⏭️  {name}: {ALREADY_VERIFIED}{how_to_force}")
    everything = uploader.manifest.read()
    mine = records_for(uploader.manifest, uploader.destination)
    for name in names:
        if name in everything and name not in mine:
            # uploads.json keeps one record per checkpoint (utils/uploads/uploader.py): this upload's replaces it.
            elsewhere = str(everything[name].remote_url).rsplit("/", 1)[0]
            print(f"note: {name}: uploads.json's record of its upload to {elsewhere} "
                  f"({everything[name].state}) is replaced by this upload's")
    failed = []
    for name in names:
        if force:  # a fresh record: submit() takes a verified one for done and would upload nothing
            uploader.submit_new(settings.checkpoint_dir / name)
        else:
            uploader.submit(settings.checkpoint_dir / name)
        if not uploader.is_verified(name):
            failed.append(name)
    print(f"{len(names) - len(failed)} uploaded, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = Settings(args)
        if args.command == "list":
            return command_list(settings)
        if args.command == "status":
            return command_status(settings)
        if args.command == "upload":
            return command_upload(settings, [args.name], args.force)
        return command_upload(settings, None)
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StorageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
