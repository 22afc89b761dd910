#!/usr/bin/env python3
"""Do the packages a program needs import here? One line naming each that does not, before any work starts.

    python3 bench/check_imports.py       # train.py's packages: exit 0, or 2 with one line naming what fails

A package can be present and still fail to import: google.cloud.storage loads protobuf modules generated for a
newer protobuf than a machine's image may hold. So each module is imported, not merely looked up. Standard
library only, so that it runs where torch itself is missing.
"""
import importlib
import sys
from collections.abc import Sequence

TRAIN_IMPORTS = ("torch", "numpy", "transformers", "accelerate", "safetensors", "tqdm", "psutil", "requests",
                 "google.cloud.storage", "google_crc32c", "zstandard", "torch.utils.tensorboard")
"""What train.py (with utils/ and configs/) imports beyond the standard library, one module per distribution,
and TensorBoard, its default tracker, as Accelerate imports it (tensorboard's modules are protobuf's too)."""


def import_problems(modules: Sequence[str]) -> list[str]:
    """Each module that fails to import, as 'module (ErrorType: first line of the message)'."""
    problems = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any failure (ImportError, protobuf's VersionError) is the answer
            first_line = next(iter(str(error).strip().splitlines()), "")
            problems.append(f"{module} ({type(error).__name__}{': ' + first_line if first_line else ''})")
    return problems


def require(modules: Sequence[str], program: str) -> None:
    """Exits with code 2 and one line on stderr when any of `modules` fails to import."""
    problems = import_problems(modules)
    if problems:
        print(f"error: {program} cannot start, these imports fail here: {'; '.join(problems)}", file=sys.stderr)
        raise SystemExit(2)


def main() -> int:
    require(TRAIN_IMPORTS, "train.py")
    print(f"imports ok: {', '.join(TRAIN_IMPORTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
