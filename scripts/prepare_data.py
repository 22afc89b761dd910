#!/usr/bin/env python3
"""Turn text into training shards: tokenized_*.npz files with right-padded int32 rows.

    python scripts/prepare_data.py --input corpus.jsonl --tokenizer tokenizer.json --output data/mine
    python scripts/prepare_data.py --sample          # the tiny config's data, built offline

Each document becomes one or more rows of `--row-length` tokens (longer documents are split), written
with np.savez_compressed as `input_ids` and `attention_mask`, the layout of the original tokenizer.
The tokenizer is copied into the output folder as tokenizer.json, where training finds it (and copies it
into every checkpoint, for export and generation). Bad input is a one-line error with exit code 2.
`--sample` gathers the docstrings of the Python standard library (real English text on every machine),
trains a small byte-level BPE tokenizer on them and writes the shards and tokenizer.json to data/sample/.
"""
import argparse
import ast
import json
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
END_OF_TEXT = "<|endoftext|>"
SAMPLE_VOCAB_SIZE = 4096  # the tiny preset's vocab_size
SAMPLE_CHARACTERS = 1_700_000
TOKENIZER_FILE = "tokenizer.json"


class PrepareError(Exception):
    """Bad input (a file, a field, a tokenizer); the message is one line."""


def stdlib_docstrings(limit_chars: int) -> list[str]:
    """Docstrings of modules, classes and functions of the standard library, in a fixed file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if any(part in {"test", "tests", "idlelib", "site-packages"} for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    texts.append(doc)
                    total += len(doc)
                    if total >= limit_chars:
                        return texts
    return texts


def train_sample_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def read_documents(paths: list[Path], text_key: str) -> Iterator[str]:
    """Plain text files are one document each; .jsonl files give one document per line's text_key."""
    for path in paths:
        try:
            if path.suffix == ".jsonl":
                with open(path, encoding="utf-8") as handle:
                    for number, line in enumerate(handle, 1):
                        if line.strip():
                            yield jsonl_text(line, text_key, f"{path}:{number}")
            else:
                yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise PrepareError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise PrepareError(f"{path}: unreadable ({error.strerror or error})") from None


def jsonl_text(line: str, text_key: str, where: str) -> str:
    """The text of one .jsonl line: a JSON object whose `text_key` field is a string."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise PrepareError(f"{where}: not valid JSON") from None
    if not isinstance(record, dict) or text_key not in record:
        keys = f" (its fields: {', '.join(sorted(map(str, record)))})" if isinstance(record, dict) else ""
        raise PrepareError(f"{where}: not a JSON object with a {text_key!r} field{keys}; choose it with --text-key")
    if not isinstance(record[text_key], str):
        raise PrepareError(f"{where}: the {text_key!r} field is a {type(record[text_key]).__name__}, not a string")
    return record[text_key]


def document_rows(token_ids: list[int], row_length: int) -> list[list[int]]:
    return [token_ids[i:i + row_length] for i in range(0, len(token_ids), row_length)]


def write_shard(path: Path, rows: list[list[int]], row_length: int) -> None:
    input_ids = np.zeros((len(rows), row_length), dtype=np.int32)
    attention_mask = np.zeros((len(rows), row_length), dtype=np.int32)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    np.savez_compressed(path, input_ids=input_ids, attention_mask=attention_mask)


def write_shards(documents: Iterator[str], tokenizer: Tokenizer, output: Path, rows_per_shard: int,
                 row_length: int) -> int:
    """Tokenizes the documents and writes tokenized_00000.npz, ...; returns the shard count."""
    output.mkdir(parents=True, exist_ok=True)
    rows: list[list[int]] = []
    shard_count = 0
    for document in tqdm(documents, desc="tokenizing", unit="doc"):
        ids = tokenizer.encode(document).ids
        rows.extend(document_rows(ids, row_length) if ids else [])
        while len(rows) >= rows_per_shard:
            write_shard(output / f"tokenized_{shard_count:05d}.npz", rows[:rows_per_shard], row_length)
            rows, shard_count = rows[rows_per_shard:], shard_count + 1
    if rows:
        write_shard(output / f"tokenized_{shard_count:05d}.npz", rows, row_length)
        shard_count += 1
    return shard_count


def build_sample(output: Path, shards: int = 8, row_length: int = 512) -> None:
    texts = stdlib_docstrings(SAMPLE_CHARACTERS)
    tokenizer = train_sample_tokenizer(texts, SAMPLE_VOCAB_SIZE)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / TOKENIZER_FILE))
    rows = sum(len(document_rows(tokenizer.encode(t).ids, row_length)) for t in texts)
    written = write_shards(iter(texts), tokenizer, output, -(-rows // shards), row_length)
    print(f"Sample data: {len(texts)} docstrings, {sum(map(len, texts)):,} characters -> {written} shards "
          f"and tokenizer.json (vocab {tokenizer.get_vocab_size()}) in {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", action="store_true", help="build the tiny config's sample data offline")
    parser.add_argument("--input", nargs="+", type=Path, help="text files or .jsonl files to tokenize")
    parser.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer.json")
    parser.add_argument("--output", type=Path, help="folder for the shards (default data/sample with --sample)")
    parser.add_argument("--text-key", default="text", help="the field holding the text in .jsonl lines")
    parser.add_argument("--rows-per-shard", type=int, default=10000, help="rows in each shard")
    parser.add_argument("--row-length", type=int, default=2048, help="tokens per row; longer documents are split")
    args = parser.parse_args(argv)

    if args.sample:
        build_sample(args.output or SAMPLE_DIR)
        return 0
    if not args.input or not args.tokenizer or not args.output:
        parser.error("give --sample, or all of --input, --tokenizer and --output")
    for path in [*args.input, args.tokenizer]:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    if args.rows_per_shard <= 0 or args.row_length <= 0:
        parser.error("--rows-per-shard and --row-length must be positive")
    try:
        written, tokenizer = prepare(args.input, args.tokenizer, args.output, args.text_key, args.rows_per_shard,
                                     args.row_length)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    eos = (f"{END_OF_TEXT} id {end_of_text}: set model.eos_token_id to it" if end_of_text is not None
           else f"no {END_OF_TEXT} token: set model.eos_token_id to the tokenizer's end-of-text id")
    print(f"Wrote {written} shards and {TOKENIZER_FILE} to {args.output} (vocab {tokenizer.get_vocab_size()}, {eos})")
    return 0


def prepare(inputs: list[Path], tokenizer_file: Path, output: Path, text_key: str, rows_per_shard: int,
            row_length: int) -> tuple[int, Tokenizer]:
    """Writes the shards and a copy of the tokenizer (as tokenizer.json) into output; returns the shard count."""
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # the tokenizers library raises its own exception types
        raise PrepareError(f"{tokenizer_file}: not a tokenizer.json ({str(error).splitlines()[0]})") from None
    try:
        written = write_shards(read_documents(inputs, text_key), tokenizer, output, rows_per_shard, row_length)
        # Beside the shards, where train.py looks for the run's tokenizer.
        target = output / TOKENIZER_FILE
        if not (target.exists() and target.samefile(tokenizer_file)):
            shutil.copyfile(tokenizer_file, target)
    except OSError as error:
        raise PrepareError(f"--output {output}: cannot write ({error.strerror or error})") from None
    return written, tokenizer


if __name__ == "__main__":
    sys.exit(main())
