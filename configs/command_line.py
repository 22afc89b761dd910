"""train.py's command line: its flags, and the TrainingConfig they and the config file make together."""
import argparse
import json
from typing import Any, NoReturn

from configs.model_config import shape_as_dict
from configs.training_config import PATH_FIELDS, ConfigError, TrainingConfig, load_config, path_from_here


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one `error:` line with exit code 2, like every other bad input of a run
    (argparse prints its usage first); --help still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="train.py",
        description="Pre-train GPT-NeoX on .npz token shards, with full-state checkpoints and exact resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="test",
                        help="test, production, tiny (configs/NAME.json) or the path of a JSON config")
    parser.add_argument("--max-steps", type=int, help="override max_steps (optimizer steps)")
    parser.add_argument("--resume", metavar="NAME|latest|auto",
                        help="continue from a checkpoint in checkpoint_dir or at the upload destination: its folder "
                             "name, 'latest', or 'auto' (the newest where there is one, else a fresh start: the same "
                             "command for every boot of a preemptible machine)")
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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="set any TrainingConfig field (configs/training_config.py), repeatable: VALUE is JSON "
                             "(3e-4, true, null, [\"tensorboard\"]) or else a string; model.FIELD sets a field of the "
                             "model shape, e.g. --set model.seq_len=1024")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file, flags and --set together) as JSON and exit")
    return parser.parse_args(argv)


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs: JSON values, or plain strings; paths typed here are relative to this folder."""
    parsed: dict[str, Any] = {}
    for setting in settings:
        key, sign, text = setting.partition("=")
        if not sign or not key.strip():
            raise ConfigError(f"--set {setting!r}: expected KEY=VALUE, e.g. --set learning_rate=3e-4")
        try:
            value = json.loads(text)
        except ValueError:
            value = text  # a bare word: gs://bucket/run1, data/mine
        if key in PATH_FIELDS and isinstance(value, str):
            value = path_from_here(value)
        parsed[key.strip()] = value
    return parsed


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    no_uploads = args.upload_destination == "none"
    flags: dict[str, Any] = {"max_steps": args.max_steps, "data": path_from_here(args.data),
                             "checkpoint_dir": path_from_here(args.checkpoint_dir),
                             "log_dir": path_from_here(args.log_dir),
                             "gcs_credentials": path_from_here(args.gcs_credentials),
                             "peak_tflops": args.peak_tflops,
                             "upload_destination": None if no_uploads else path_from_here(args.upload_destination),
                             "background_upload": False if args.no_background_upload else None,
                             "memory_preflight": False if args.skip_preflight else None}
    given = {key for key, value in flags.items() if value is not None} | ({"upload_destination"} if no_uploads else set())
    settings = parse_settings(args.settings)
    for key in sorted(given & settings.keys()):  # which one should win would be anybody's guess
        raise ConfigError(f"{key} is given twice, by its flag and by --set {key}=...; give it once")
    if no_uploads:
        settings["upload_destination"] = None  # a value among settings; None among flags means "not given"
    return load_config(args.config, flags, settings).with_repo_paths()


def resolved_config_json(config: TrainingConfig) -> str:
    """--print-config: every field, and the model shape its preset and overrides give."""
    return json.dumps({**config.to_dict(), "model_shape": shape_as_dict(config.model_shape())}, indent=2)
