"""train.py's command line: its flags, and the TrainingConfig they and the config file make together."""
import argparse
from typing import Any

from configs.training_config import TrainingConfig, load_config, path_from_here


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
    overrides: dict[str, Any] = {"max_steps": args.max_steps, "data": path_from_here(args.data),
                                 "checkpoint_dir": path_from_here(args.checkpoint_dir),
                                 "log_dir": path_from_here(args.log_dir),
                                 "gcs_credentials": path_from_here(args.gcs_credentials),
                                 "peak_tflops": args.peak_tflops}
    if args.upload_destination not in (None, "none"):
        overrides["upload_destination"] = path_from_here(args.upload_destination)
    if args.no_background_upload:
        overrides["background_upload"] = False
    if args.skip_preflight:
        overrides["memory_preflight"] = False
    config = load_config(args.config, overrides)
    if args.upload_destination == "none":
        config.upload_destination = None
    return config.with_repo_paths()
