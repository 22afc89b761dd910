#!/usr/bin/env python3
"""Generate text from a training checkpoint or an exported Hugging Face model folder.

    python scripts/generate.py checkpoints/tiny/checkpoint-epoch0-step200-files8 --prompt "Return the"
    python scripts/generate.py exports/refocused-1.2b --prompt "The" --max-new-tokens 100 --temperature 0.7
    python scripts/generate.py gs://refocused-ai/Checkpoints/checkpoint-epoch0-step10000-files8 --prompt "The"
    python scripts/generate.py checkpoint-epoch0-step10000-files8.tar.zst --prompt "The"   # an archive

The model is a checkpoint folder, a checkpoint archive (.tar, .tar.zst, .tar.gz, as the uploader writes
them), gs://bucket/prefix/<checkpoint name or archive>, or an exported Hugging Face model folder.

The text is written with the run's tokenizer: the exported folder's, else the checkpoint's tokenizer.json
(or the run's, as utils/checkpoints/export.py finds it), else --tokenizer. Sampling is seeded (--seed), so the
same command prints the same text; --temperature 0 decodes greedily.
"""
import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, set_seed  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from utils.checkpoints.export import (
    TOKENIZER_FILE,
    checkpoint_tokenizer,
    hf_tokenizer,
    load_checkpoint_model,
    materialize_checkpoint,
)
from utils.errors import ExportError


def load_model_and_tokenizer(location: Path, tokenizer_override: Path | None, allow_unverified: bool,
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """From an exported folder (config.json) or a training checkpoint (allow_unverified: also one without
    checksums.json); a clear ExportError otherwise."""
    # A training checkpoint holds a config.json too, but is read (and its checksums checked) as a checkpoint.
    if (location / "config.json").is_file() and not (location / "training_config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ExportError(f"{location}: not a loadable model folder ({str(error).splitlines()[0]})") from None
        tokenizer_file = tokenizer_override or location / TOKENIZER_FILE
        where = "the model folder"
    else:
        model = load_checkpoint_model(location, allow_unverified)
        tokenizer_file = tokenizer_override or checkpoint_tokenizer(location)
        where = "the checkpoint or beside the run's shards"
    if tokenizer_file is None or not tokenizer_file.exists():
        raise ExportError(f"{location}: no tokenizer (no {TOKENIZER_FILE} in {where}); pass --tokenizer PATH")
    return model, hf_tokenizer(tokenizer_file, model.config.eos_token_id)


def check_tokenizer_path(path: Path) -> None:
    """--tokenizer names a tokenizer.json or a folder holding one."""
    if not path.exists():
        raise ExportError(f"--tokenizer {path}: no such file")
    if path.is_dir() and not (path / TOKENIZER_FILE).is_file():
        raise ExportError(f"--tokenizer {path}: a folder without {TOKENIZER_FILE}")


def check_device(name: str) -> torch.device:
    """The --device to run on: cpu, cuda, cuda:N or mps, and only one this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ExportError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ExportError(f"--device {name}: {reason}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ExportError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ExportError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise ExportError(f"--device {name}: not supported (use cpu, cuda or cuda:N)")
    return device


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int,
             temperature: float, top_p: float, seed: int) -> str:
    """The prompt's continuation (without the prompt)."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    if input_ids.shape[1] == 0:  # an empty prompt starts from the end-of-text token, like a new document
        input_ids = torch.tensor([[model.config.eos_token_id or 0]])
    context = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > context:
        raise ExportError(f"the prompt ({input_ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                          f"the model's context of {context} tokens")
    model.eval()
    set_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    with torch.no_grad():
        output = model.generate(input_ids.to(model.device), attention_mask=torch.ones_like(input_ids).to(model.device),
                                max_new_tokens=max_new_tokens, pad_token_id=model.config.eos_token_id, **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate text from a training checkpoint or an exported Hugging Face model folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", metavar="CHECKPOINT_OR_DIR",
                        help="a checkpoint folder, a checkpoint archive (.tar, .tar.zst, .tar.gz), "
                             "gs://bucket/prefix/<checkpoint name or archive>, or an exported model folder")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the top tokens of this mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json (or a folder holding one) to use instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="read a checkpoint without checksums.json (saved by an earlier version): its files are "
                             "then not verified")
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        parser.error("--max-new-tokens must be positive")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # download progress of a remote checkpoint
    transformers_logging.disable_progress_bar()
    try:
        device = check_device(args.device)  # both before the (possibly long) download and load of the model
        if args.tokenizer is not None:
            check_tokenizer_path(args.tokenizer)
        with tempfile.TemporaryDirectory(prefix="generate-") as workdir:
            location = materialize_checkpoint(args.model, Path(workdir))
            if not location.is_dir():
                raise ExportError(f"{args.model}: no such checkpoint or model folder")
            model, tokenizer = load_model_and_tokenizer(location, args.tokenizer, args.allow_unverified)
        model.to(device)
        text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
