#!/usr/bin/env python3
"""Export a training checkpoint as a standard Hugging Face model folder (the command line of utils/checkpoints/export.py).

    python scripts/export_hf.py checkpoints/checkpoint-epoch0-step10000-files8 exports/refocused-1.2b
    python scripts/export_hf.py CHECKPOINT OUT_DIR --dtype fp32 --tokenizer data/mine/tokenizer.json
    python scripts/export_hf.py gs://refocused-ai/Checkpoints/checkpoint-epoch0-step10000-files8 OUT_DIR
    python scripts/export_hf.py checkpoint-epoch0-step10000-files8.tar.zst OUT_DIR

OUT_DIR gets config.json, generation_config.json, model.safetensors (bf16 or fp32) and, when the run has a
tokenizer, tokenizer.json with tokenizer_config.json, so that AutoModelForCausalLM.from_pretrained(OUT_DIR)
and AutoTokenizer.from_pretrained(OUT_DIR) load it with no custom code. The tokenizer is --tokenizer, else
the checkpoint's tokenizer.json (copied there at save time), else the run's (its `tokenizer` field or
tokenizer.json beside its shards).
"""
import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.checkpoints.export import DTYPES, export_checkpoint, materialize_checkpoint
from utils.errors import ExportError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a training checkpoint as a Hugging Face model folder (config.json, model.safetensors, "
                    "tokenizer) that AutoModelForCausalLM.from_pretrained loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, a checkpoint archive (.tar, .tar.zst, .tar.gz) or "
                        "gs://bucket/prefix/<checkpoint name or archive>")
    parser.add_argument("out_dir", type=Path, help="the model folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the exported weights")
    parser.add_argument("--tokenizer", type=Path,
                        help="a tokenizer.json (or a folder holding one) to include instead of the run's own")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="export a checkpoint without checksums.json (saved by an earlier version): its files are "
                             "then not verified")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # download progress of a remote checkpoint
    try:
        # A remote checkpoint is unpacked beside OUT_DIR: on the same disk, which has room for the export.
        args.out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-hf-", dir=args.out_dir.parent) as workdir:
            checkpoint = materialize_checkpoint(args.checkpoint, Path(workdir))
            exported = export_checkpoint(checkpoint, args.out_dir, args.dtype, args.tokenizer, args.overwrite,
                                         args.allow_unverified)
            # The tokenizer's source, unless it lies in the unpacked checkpoint deleted just below.
            source = exported.tokenizer
            if source is not None and Path(workdir).resolve() in source.resolve().parents:
                source = None
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {exported.parameters:,} parameters ({exported.dtype}) to {exported.out_dir}")
    if exported.tokenizer is None:
        print("note: no tokenizer found (none in the checkpoint or beside the run's shards); the folder holds the "
              "model only; pass --tokenizer to include one")
    else:
        print(f"Tokenizer: {exported.tokenizer_file}" + (f" (from {source})" if source is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
