"""Export a training checkpoint as a standard Hugging Face model folder, and read one back for generation.

OUT_DIR gets config.json, generation_config.json, model.safetensors (bf16 or fp32) and, when the run has a
tokenizer, tokenizer.json with tokenizer_config.json, so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR)   # and AutoTokenizer.from_pretrained(OUT_DIR)

load it with no custom code. The weights are the checkpoint's own tensors (Accelerate's fp32
model.safetensors, or the sharded folder of an FSDP run), renamed from any wrapper prefix and cast; no
model is built. The tokenizer is the caller's, else the checkpoint's tokenizer.json (copied there at save
time), else the run's (its `tokenizer` field or tokenizer.json beside its shards). scripts/export_hf.py and
scripts/generate.py are the command lines over this module; train.py uses it for `export_hf_dir`.
"""
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from configs.model_config import ModelShape, build_model_config
from configs.training_config import FILES_FORMAT
from utils.checkpoints.checksums import ChecksumError, verify_checksums
from utils.checkpoints.untrusted import check_sharded_folder, refuse_unverified
from utils.checkpoints.writer import follow_umask
from utils.errors import CheckpointError, ExportError
from utils.storage import is_gcs_url, open_storage
from utils.storage.base import StorageError
from utils.uploads.destination import remote_checkpoints, restore_checkpoint
from utils.uploads.formats import extract_archive, split_archive_name

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
"""Where Accelerate saves the model of an FSDP run (SHARDED_STATE_DICT: a torch.distributed.checkpoint folder)."""


@dataclass(frozen=True)
class Exported:
    out_dir: Path
    parameters: int
    dtype: str
    tokenizer: Path | None
    """Where the tokenizer was taken from (may be inside a temporary unpacked checkpoint), or None."""

    @property
    def tokenizer_file(self) -> Path | None:
        """The tokenizer.json in out_dir, when one was exported."""
        return None if self.tokenizer is None else self.out_dir / TOKENIZER_FILE


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint
# ---------------------------------------------------------------------------------------------

def read_checkpoint_json(checkpoint: Path, name: str) -> dict:
    path = checkpoint / name
    if not path.is_file():
        raise ExportError(f"{checkpoint}: not a training checkpoint (no {name})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: unreadable ({error})") from None


def check_checkpoint(checkpoint: Path, allow_unverified: bool) -> None:
    """A training checkpoint whose files an export reads are as they were saved (checksums.json); one without
    checksums.json is refused unless allow_unverified."""
    if not checkpoint.exists():
        raise ExportError(f"{checkpoint}: no such checkpoint")
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: not a checkpoint folder")
    if not (checkpoint / "training_config.json").is_file():
        raise ExportError(f"{checkpoint}: not a training checkpoint (no training_config.json)")
    if not (checkpoint / MODEL_FILE).is_file() and not (checkpoint / FSDP_MODEL_DIR).is_dir():
        raise ExportError(f"{checkpoint}: no model weights (neither {MODEL_FILE} nor {FSDP_MODEL_DIR}/)")
    try:
        verified = verify_checksums(checkpoint, only=lambda name: (checkpoint / name).exists() and (
            name in (MODEL_FILE, "training_config.json", TOKENIZER_FILE) or name.startswith(f"{FSDP_MODEL_DIR}/")))
        if not verified:
            refuse_unverified(checkpoint, allow_unverified, "pass --allow-unverified")
    except (ChecksumError, CheckpointError) as error:
        raise ExportError(str(error)) from None


def checkpoint_model_config(checkpoint: Path) -> GPTNeoXConfig:
    """The Hugging Face config of the checkpoint's model, from the model_shape in training_config.json."""
    shape = read_checkpoint_json(checkpoint, "training_config.json").get("model_shape")
    if not isinstance(shape, dict):
        raise ExportError(f"{checkpoint}/training_config.json: no model_shape")
    try:
        return hf_model_config(ModelShape(**shape), torch.float32)
    except TypeError as error:
        raise ExportError(f"{checkpoint}/training_config.json: bad model_shape ({error})") from None


def hf_model_config(shape: ModelShape, dtype: torch.dtype) -> GPTNeoXConfig:
    """The config.json of a Hugging Face model folder of `shape` with weights of `dtype`: transformers' own SDPA
    attention (training's causal_sdpa is registered by this project alone), the KV cache on for generation."""
    config = build_model_config(shape)
    config.use_cache = True  # training turns the KV cache off; generation wants it
    config.dtype = dtype
    config.architectures = [GPTNeoXForCausalLM.__name__]
    return config


def model_folder_json(shape: ModelShape, tokenizer: Path | None) -> dict[str, dict]:
    """The small files that make a training checkpoint, beside its fp32 model.safetensors and tokenizer.json, a
    Hugging Face model folder (from_pretrained, pipeline, lm-evaluation-harness load it as it is), by name:
    config.json, generation_config.json, and with a tokenizer its tokenizer_config.json."""
    config = hf_model_config(shape, torch.float32)
    files = {"config.json": json.loads(config.to_json_string()),
             "generation_config.json": json.loads(GenerationConfig.from_model_config(config).to_json_string())}
    if tokenizer is None:
        return files
    with tempfile.TemporaryDirectory(prefix="tokenizer-config-") as scratch:
        try:
            save_hf_tokenizer(tokenizer, config, Path(scratch))
        except ExportError as error:  # training goes on: the tokenizer is still copied as it is
            log.warning(f"⚠️  {error}: checkpoints get no tokenizer_config.json, so AutoTokenizer will not load them")
            return files
        files.update({path.name: json.loads(path.read_text()) for path in Path(scratch).glob("*.json")
                      if path.name != TOKENIZER_FILE})  # the checkpoint keeps the run's own tokenizer.json
    return files


def saved_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model tensors as saved: Accelerate's model.safetensors, or the sharded (DCP) folder that
    Accelerate writes under FSDP, gathered into whole tensors."""
    if (checkpoint / MODEL_FILE).is_file():
        try:
            return load_file(checkpoint / MODEL_FILE)
        except (SafetensorError, OSError) as error:
            raise ExportError(f"{checkpoint / MODEL_FILE}: unreadable ({error})") from None
    sharded = checkpoint / FSDP_MODEL_DIR
    try:
        check_sharded_folder(sharded)  # what dcp_to_torch_save unpickles, checked before it does
        with tempfile.TemporaryDirectory(prefix="export-hf-fsdp-") as scratch:
            dcp_to_torch_save(sharded, Path(scratch) / "model.pt")
            return torch.load(Path(scratch) / "model.pt", weights_only=True)["model"]
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise ExportError(f"{sharded}: unreadable sharded checkpoint ({str(error).splitlines()[0]})") from None


def parameter_name(saved_name: str) -> str:
    """The model's own name for a saved tensor: without DDP's leading "module." and torch.compile's "_orig_mod."
    (which regional compilation puts inside layer names)."""
    parts = [part for part in saved_name.split(".") if part != "_orig_mod"]
    return ".".join(parts[1:] if parts[0] == "module" else parts)


def checkpoint_state(checkpoint: Path, config: GPTNeoXConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under the model's own parameter names, checked against the architecture."""
    state = {parameter_name(name): tensor for name, tensor in saved_weights(checkpoint).items()}
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in GPTNeoXForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        # The output embedding is the input embedding; HF stores it once and ties them on load.
        expected.pop("embed_out.weight", None)
        state.pop("embed_out.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{checkpoint / MODEL_FILE} does not match the model in training_config.json "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ExportError(f"{checkpoint / MODEL_FILE}: {name} has shape {tuple(state[name].shape)}, "
                              f"the model in training_config.json wants {tuple(shape)}")
    return state


def checkpoint_tokenizer(checkpoint: Path) -> Path | None:
    """The checkpoint's tokenizer.json, else the run's (its `tokenizer` field or the data folder's), if present."""
    if (checkpoint / TOKENIZER_FILE).is_file():
        return checkpoint / TOKENIZER_FILE
    config = read_checkpoint_json(checkpoint, "training_config.json")
    candidates = [config.get("tokenizer"), str(Path(config.get("data") or ".") / TOKENIZER_FILE)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def hf_tokenizer(tokenizer_file: Path, eos_token_id: int | None) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a tokenizers tokenizer.json, with the model's end-of-text token."""
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ExportError(f"{tokenizer_file}: no such tokenizer file")
    try:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    except Exception as error:  # the tokenizers library raises its own exception types
        raise ExportError(f"{tokenizer_file}: not a tokenizer.json ({str(error).splitlines()[0]})") from None
    if eos_token_id is not None:
        eos = tokenizer.convert_ids_to_tokens(eos_token_id)
        if eos is None:
            raise ExportError(f"{tokenizer_file}: has no token with the model's end-of-text id {eos_token_id}")
        tokenizer.eos_token = tokenizer.bos_token = eos
    return tokenizer


def load_checkpoint_model(checkpoint: Path, allow_unverified: bool = False) -> GPTNeoXForCausalLM:
    """The checkpoint's model in fp32, built in memory (what export writes, without the folder); allow_unverified:
    also from a checkpoint without checksums.json."""
    check_checkpoint(checkpoint, allow_unverified)
    config = checkpoint_model_config(checkpoint)
    state = checkpoint_state(checkpoint, config)
    with no_init_weights():  # every weight is overwritten just below
        model = GPTNeoXForCausalLM(config)
    # Keys were checked by checkpoint_state; only a tied output embedding may be absent.
    model.load_state_dict(state, strict=False)
    return model


def export_files(relative_path: str) -> bool:
    """What export and generation read of a checkpoint: the weights and the JSON files (config, tokenizer),
    not the optimizer state or the RNG states (two thirds of a checkpoint)."""
    return (relative_path == MODEL_FILE or relative_path.startswith(FSDP_MODEL_DIR + "/")
            or relative_path.endswith(".json"))


def materialize_checkpoint(reference: str, workdir: Path) -> Path:
    """A local checkpoint folder for `reference`, holding at least what export and generation read: a checkpoint
    folder as is; a local checkpoint archive (<name>.tar, .tar.zst, .tar.gz) or files manifest
    (<name>.files.json beside its <name>/ folder) unpacked or copied into workdir; gs://bucket/prefix/<name>
    (or its archive or manifest) streamed into workdir, checked (size and crc32c). What is copied into workdir
    skips the optimizer and RNG states (export_files)."""
    try:
        if is_gcs_url(reference):
            prefix, _, object_name = reference.rstrip("/").rpartition("/")
            storage = open_storage(prefix)
            if split_archive_name(object_name) is None:  # a bare checkpoint name: find its files or archive
                found = remote_checkpoints(storage).get(object_name)
                if found is None:
                    raise ExportError(f"{reference}: no checkpoint {object_name} at {prefix} (neither "
                                      f"{object_name}.files.json nor {object_name}.tar*)")
                obj = found[1]
            else:
                obj = storage.stat(object_name)
                if obj is None:
                    raise ExportError(f"{reference}: no such object")
            return restore_checkpoint(storage, obj, workdir, include=export_files)
        path = Path(reference)
        split = split_archive_name(path.name)
        if path.is_file() and split is not None and split[1] == FILES_FORMAT:
            storage = open_storage(str(path.parent))
            info = storage.stat(path.name)
            assert info is not None
            return restore_checkpoint(storage, info, workdir, include=export_files)
        if path.is_file() and split is not None:
            return extract_archive(path, split[1], workdir, split[0], include=export_files)
    except (StorageError, CheckpointError) as error:
        raise ExportError(f"{reference}: {error}") from None
    return path


# ---------------------------------------------------------------------------------------------
# Writing the model folder
# ---------------------------------------------------------------------------------------------

def write_model_folder(checkpoint: Path, out_dir: Path, dtype: str, tokenizer: Path | None) -> int:
    """Writes config.json, generation_config.json, model.safetensors and the tokenizer into out_dir."""
    config = checkpoint_model_config(checkpoint)
    state = checkpoint_state(checkpoint, config)
    config.dtype = DTYPES[dtype]
    out_dir.mkdir(parents=True)
    save_file({name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in state.items()},
              out_dir / MODEL_FILE, metadata={"format": "pt"})
    follow_umask(out_dir / MODEL_FILE)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, config, out_dir)
    return sum(tensor.numel() for tensor in state.values())


def save_hf_tokenizer(tokenizer: Path, config: GPTNeoXConfig, out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json in out_dir, as AutoTokenizer loads them."""
    hf = hf_tokenizer(tokenizer, config.eos_token_id)
    hf.model_max_length = config.max_position_embeddings
    hf.save_pretrained(out_dir)
    # The class name every transformers version knows (v5 would write its own "TokenizersBackend").
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def check_export_target(out_dir: Path, overwrite: bool) -> None:
    """Refuses an out_dir that holds something, unless `overwrite` and it is an earlier export."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise ExportError(f"{out_dir} already exists and is not empty; choose another folder or pass --overwrite")
        if not (out_dir / "config.json").is_file() or (out_dir / "training_config.json").is_file():
            raise ExportError(f"{out_dir} is not an exported model folder (no config.json, or a training "
                              "checkpoint); refusing to replace it")


def export_checkpoint(checkpoint: Path, out_dir: Path, dtype: str = "bf16", tokenizer: Path | None = None,
                      overwrite: bool = False, allow_unverified: bool = False) -> Exported:
    """Exports `checkpoint` into out_dir, through a temporary sibling folder renamed when complete.

    An existing out_dir is an error unless `overwrite`, and even then only an earlier export (a folder
    holding config.json) is replaced. A checkpoint without checksums.json is refused unless allow_unverified.
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_checkpoint(checkpoint, allow_unverified)
    tokenizer = tokenizer if tokenizer is not None else checkpoint_tokenizer(checkpoint)
    check_export_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent) as scratch:
        staged = Path(scratch) / "model"
        parameters = write_model_folder(checkpoint, staged, dtype, tokenizer)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return Exported(out_dir, parameters, dtype, tokenizer)
