"""A checkpoint folder read as untrusted input: anyone who can write the bucket or the disk it comes from can craft
its files, and their checksums.json with them (checksums tell damage, not trust). So nothing of it is unpickled in
a way that can run code: every file is read as safetensors, as JSON, or by torch.load(weights_only=True), and the
two pickles that torch.distributed.checkpoint reads with the full unpickler are checked before it reads them.

- A sharded folder's `.metadata` (FSDP: pytorch_model_fsdp_0/, optimizer_0/), which FileSystemReader.read_metadata
  reads with pickle.load (and `__{rank}.metadata` when that fails): each must unpickle with MetadataUnpickler, which
  builds only the data classes such a file consists of.
- The non-tensor values of a sharded state (the optimizer's param_groups: lr, betas, ...), which DCP's
  DefaultLoadPlanner.load_bytes reads with torch.load(weights_only=False): each must load with weights_only=True.

Each check reads the bytes the later load reads (why that makes the load safe: MetadataUnpickler). Also here: the
RNG files, which Accelerate's load_state skips without a word when they do not load.
"""
import io
import logging
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as accelerate_load
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from utils.checkpoints.checksums import ChecksumError, verify_checksums
from utils.errors import CheckpointError

log = logging.getLogger(__name__)
METADATA_FILES = "*.metadata"
"""What torch.distributed.checkpoint reads with pickle.load in a sharded folder: `.metadata`, else (when that one
does not load) the rank's own `__{rank}.metadata`."""
RNG_FILES = "random_states_*.pkl"
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")
"""What Accelerate's load_state restores from every RNG file (the CUDA state only where there is a GPU)."""
WEIGHTS_ONLY_REASONS = ("WeightsUnpickler error: ", "Trying to load ")
"""How the line that says why torch.load(weights_only=True) refused a file begins (it depends on the refusal)."""
METADATA_CLASSES: dict[tuple[str, str], Any] = {
    (cls.__module__, cls.__qualname__): cls for cls in (
        dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta, dcp_metadata.TensorProperties,
        dcp_metadata.TensorStorageMetadata, dcp_metadata.ChunkStorageMetadata, dcp_metadata.BytesStorageMetadata,
        dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size, pathlib.PosixPath,
        torch.serialization._get_layout)}
"""Every class a `.metadata` names (found by writing real ones) but the torch dtypes: dataclasses and an enum, a
torch.Size, the save's path, and the function that looks a torch.layout up by its name."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles what torch.distributed.checkpoint writes as `.metadata`, and refuses any other name.

    Why a file this unpickler loads is safe for pickle.load: a pickle runs code only by calling objects, and it can
    reach an object only by naming it, through find_class (GLOBAL, STACK_GLOBAL, INST, and the EXT codes of copyreg's
    registry alike); the opcodes that call (REDUCE, NEWOBJ, OBJ, BUILD's __setstate__) call what it built from those.
    A persistent id needs a persistent_load, which neither unpickler has. Both unpicklers run the same opcodes on the
    same bytes, and differ only in find_class: a file that loads here names only the classes below, so pickle.load
    calls the same constructors of plain data (dataclasses, an enum, torch.Size, a path, a dtype and layout lookup)
    with the same arguments, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = METADATA_CLASSES.get((module, name))
        if allowed is None and module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            allowed = vars(torch)[name]  # vars(): torch's module __getattr__ would import a submodule by that name
        if allowed is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, not one of the data classes of a sharded "
                                         "checkpoint's metadata")
        return allowed


def refuse_unverified(checkpoint: Path, allowed: bool, how_to_allow: str) -> None:
    """A checkpoint without checksums.json (saved by an earlier version, or its checksums.json lost): its files cannot
    be verified, so it is refused, naming how_to_allow, unless allowed: then loaded with a warning that says so."""
    if not allowed:
        raise CheckpointError(f"{checkpoint}: records no checksums.json (saved by an earlier version, or the file was "
                              f"lost), so its files cannot be verified; {how_to_allow} to load it unverified")
    log.warning(f"⚠️  {checkpoint}: records no checksums.json: its files are NOT verified (a damaged file is loaded as "
                "it is); loading it because unverified checkpoints are allowed")


def check_sharded_folder(folder: Path) -> None:
    """Every `.metadata` of a sharded folder and the pickled values it points at, before torch.distributed.checkpoint
    reads them with the full unpickler. A CheckpointError naming the file otherwise."""
    for path in sorted(folder.glob(METADATA_FILES)):
        metadata = read_metadata(path)
        for index, stored in metadata.storage_data.items():
            if isinstance(metadata.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata):
                check_pickled_value(path, index.fqn, stored)


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """`.metadata` unpickled by MetadataUnpickler, with the shape read_metadata and the load rely on."""
    try:
        with open(path, "rb") as handle:
            metadata = MetadataUnpickler(handle).load()
        complete = well_formed(metadata)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused ({error})") from None
    except Exception as error:  # truncated or garbled: anything from EOFError to TypeError, or AttributeError from
        # a crafted object without the attributes its class has
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    if not complete:
        raise CheckpointError(f"{path}: not the metadata of a sharded checkpoint")
    return metadata


def well_formed(metadata: Any) -> bool:
    """A Metadata whose storage entries have the types the load relies on (a crafted one may hold any allowed ones)."""
    return (isinstance(metadata, dcp_metadata.Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, dict)
            and all(isinstance(index, dcp_metadata.MetadataIndex) and isinstance(index.fqn, str)
                    and isinstance(stored, _StorageInfo) and isinstance(stored.relative_path, str)
                    and isinstance(stored.offset, int) and isinstance(stored.length, int)
                    and stored.offset >= 0 and stored.length >= 0
                    for index, stored in metadata.storage_data.items()))


def check_pickled_value(metadata_file: Path, fqn: str, stored: _StorageInfo) -> None:
    """The bytes of one non-tensor value, as DCP's FileSystemReader slices them, load with weights_only=True."""
    folder = metadata_file.parent
    shard = folder / stored.relative_path
    if (Path(stored.relative_path).name != stored.relative_path or not shard.is_file()
            or stored.transform_descriptors):  # DCP's transforms (compression) are never written here
        raise CheckpointError(f"{metadata_file}: {fqn} is not stored plainly in a shard file of {folder} "
                              f"({stored.relative_path!r}, transforms {stored.transform_descriptors})")
    with open(shard, "rb") as handle:
        handle.seek(stored.offset)
        value = handle.read(stored.length)
    try:
        torch.load(io.BytesIO(value), weights_only=True)
    except Exception as error:  # refused (UnpicklingError), truncated or garbled
        raise CheckpointError(f"{shard}: {fqn} refused ({load_failure(error)})") from None


def check_rng_files(checkpoint: Path) -> None:
    """Every RNG file loads as load_state loads it (weights_only=True) and holds what it restores: load_state skips
    one that does not with a log line only, and the run would go on with other random numbers."""
    for rng_file in sorted(checkpoint.glob(RNG_FILES)):
        try:
            state = accelerate_load(rng_file)
        except Exception as error:  # refused (UnpicklingError), or truncated: anything from EOFError to RuntimeError
            raise CheckpointError(f"{rng_file}: unreadable ({load_failure(error)})") from None
        missing = [key for key in RNG_KEYS if not isinstance(state, dict) or key not in state]
        if missing:
            raise CheckpointError(f"{rng_file}: not an RNG state (no {', '.join(missing)})")


def load_failure(error: Exception) -> str:
    """One line of why torch.load failed; of a weights_only refusal, its reason without torch's advice to load the
    file with weights_only=False."""
    text = str(error)
    if text.startswith("Weights only load failed"):
        reasons = [line.strip().removeprefix(WEIGHTS_ONLY_REASONS[0]) for line in text.splitlines()
                   if line.strip().startswith(WEIGHTS_ONLY_REASONS)]
        text = reasons[0].split(". ")[0] if reasons else "not plain data"
    return f"{type(error).__name__}: {' '.join(text.split())[:300]}"


def check_files(checkpoint: Path, allow_unverified: bool) -> None:
    """Before load_state reads anything: every file as it was saved (checksums.json; a checkpoint without one is
    refused unless allow_unverified), the pickles torch.distributed.checkpoint would unpickle with the full unpickler
    (utils/checkpoints/untrusted.py), and the RNG files, which load_state would skip without a word if they did not load."""
    try:
        verified = verify_checksums(checkpoint)
    except ChecksumError as error:
        raise CheckpointError(f"{error}; resume from another checkpoint (python scripts/checkpoint_viewer.py "
                              "list)") from None
    if not verified:
        refuse_unverified(checkpoint, allow_unverified,
                          "set allow_unverified_checkpoints (--set allow_unverified_checkpoints=true)")
    for folder in sorted({metadata.parent for metadata in checkpoint.rglob(METADATA_FILES)}):
        check_sharded_folder(folder)
    check_rng_files(checkpoint)
