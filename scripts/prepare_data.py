#!/usr/bin/env python3
"""Turn text into training shards: tokenized_*.npz files, each a token stream of whole documents.

    python scripts/prepare_data.py --input corpus.jsonl --tokenizer tokenizer.json --output data/mine
    python scripts/prepare_data.py --sample          # the tiny config's data, built offline

Each document is tokenized whole and followed by the end-of-text id: the tokenizer's <|endoftext|> token, or
--eos-id for a tokenizer that names it otherwise. Special tokens written in a document's text (the text
"<|endoftext|>" itself) are tokenized as plain text, so the end-of-text id marks document ends and nothing else.
Documents are gathered into shards of at least --tokens-per-shard tokens (the last shard may hold fewer),
never split between two shards, and written with np.savez_compressed as a 1-D `input_ids` array (uint16 when
the vocabulary fits, else int32) beside an `eos_token_id` scalar, which training checks against the model's
eos_token_id. The tokenizer is copied into the output folder as tokenizer.json, where training finds it (and
copies it into every checkpoint, for export and generation). Bad input is a one-line error with exit code 2.
`--sample` gathers the docstrings of the Python standard library (real English text on every machine),
trains a small byte-level BPE tokenizer on them and writes 8 shards and tokenizer.json to data/sample/.
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


def end_of_text_id(tokenizer: Tokenizer, eos_id: int | None, tokenizer_file: Path) -> int:
    """--eos-id, else the tokenizer's <|endoftext|> token."""
    if eos_id is None:
        eos_id = tokenizer.token_to_id(END_OF_TEXT)
        if eos_id is None:
            raise PrepareError(f"{tokenizer_file}: no {END_OF_TEXT} token; pass its end-of-text id with --eos-id")
    if not 0 <= eos_id < tokenizer.get_vocab_size():
        raise PrepareError(f"--eos-id {eos_id} is outside the tokenizer's vocabulary [0, {tokenizer.get_vocab_size()})")
    return eos_id


def token_dtype(vocab_size: int) -> type:
    """The smallest integer type that holds every id: half the disk space of int32 for GPT-2-sized vocabularies."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


def document_tokens(tokenizer: Tokenizer, text: str, eos_id: int, dtype: type) -> np.ndarray:
    """The document's ids followed by the end-of-text id; empty for a document without tokens."""
    ids = tokenizer.encode(text).ids
    return np.array([*ids, eos_id] if ids else [], dtype=dtype)


def write_shard(path: Path, documents: list[np.ndarray], eos_id: int) -> None:
    np.savez_compressed(path, input_ids=np.concatenate(documents), eos_token_id=np.array(eos_id, dtype=np.int64))


def write_shards(documents: Iterator[str], tokenizer: Tokenizer, output: Path, tokens_per_shard: int,
                 eos_id: int) -> int:
    """Tokenizes the documents and writes tokenized_00000.npz, ...; returns the shard count."""
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a text is text, not a document end
    dtype = token_dtype(tokenizer.get_vocab_size())
    shard: list[np.ndarray] = []
    size, shard_count = 0, 0
    for document in tqdm(documents, desc="tokenizing", unit="doc"):
        tokens = document_tokens(tokenizer, document, eos_id, dtype)
        if not len(tokens):
            continue
        shard.append(tokens)
        size += len(tokens)
        if size >= tokens_per_shard:  # at a document end: no document spans two shards
            write_shard(output / f"tokenized_{shard_count:05d}.npz", shard, eos_id)
            shard, size, shard_count = [], 0, shard_count + 1
    if shard:
        write_shard(output / f"tokenized_{shard_count:05d}.npz", shard, eos_id)
        shard_count += 1
    return shard_count


def build_sample(output: Path, shards: int = 8) -> None:
    texts = stdlib_docstrings(SAMPLE_CHARACTERS)
    tokenizer = train_sample_tokenizer(texts, SAMPLE_VOCAB_SIZE)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / TOKENIZER_FILE))
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    tokenizer.encode_special_tokens = True
    documents = [document_tokens(tokenizer, text, eos_id, token_dtype(SAMPLE_VOCAB_SIZE)) for text in texts]
    # Exactly `shards` shards of about equal size: shard k ends at the first document end past k+1 eighths.
    ends = np.cumsum([len(document) for document in documents])
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, shards) / shards) + 1
    for index, group in enumerate(np.split(np.arange(len(documents)), cuts)):
        write_shard(output / f"tokenized_{index:05d}.npz", [documents[i] for i in group], eos_id)
    print(f"Sample data: {len(texts)} docstrings, {sum(map(len, texts)):,} characters, {int(ends[-1]):,} tokens "
          f"-> {shards} shards and tokenizer.json (vocab {tokenizer.get_vocab_size()}, end-of-text id {eos_id}) "
          f"in {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", action="store_true", help="build the tiny config's sample data offline")
    parser.add_argument("--input", nargs="+", type=Path, help="text files or .jsonl files to tokenize")
    parser.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer.json")
    parser.add_argument("--output", type=Path, help="folder for the shards (default data/sample with --sample)")
    parser.add_argument("--text-key", default="text", help="the field holding the text in .jsonl lines")
    parser.add_argument("--tokens-per-shard", type=int, default=20_000_000,
                        help="tokens in each shard, at least (it ends at a document end; default 20,000,000)")
    parser.add_argument("--eos-id", type=int,
                        help="the end-of-text id written after each document (default: the tokenizer's <|endoftext|>)")
    args = parser.parse_args(argv)

    if args.sample:
        build_sample(args.output or SAMPLE_DIR)
        return 0
    if not args.input or not args.tokenizer or not args.output:
        parser.error("give --sample, or all of --input, --tokenizer and --output")
    for path in [*args.input, args.tokenizer]:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    if args.tokens_per_shard <= 0:
        parser.error("--tokens-per-shard must be positive")
    try:
        written, tokenizer, eos_id = prepare(args.input, args.tokenizer, args.output, args.text_key,
                                             args.tokens_per_shard, args.eos_id)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {written} shards and {TOKENIZER_FILE} to {args.output} (vocab {tokenizer.get_vocab_size()}, "
          f"end-of-text id {eos_id}: model.eos_token_id must be {eos_id}, training checks it)")
    return 0


def prepare(inputs: list[Path], tokenizer_file: Path, output: Path, text_key: str, tokens_per_shard: int,
            eos_id: int | None) -> tuple[int, Tokenizer, int]:
    """Writes the shards and a copy of the tokenizer (as tokenizer.json) into output; returns the shard count,
    the tokenizer and the end-of-text id written."""
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # the tokenizers library raises its own exception types
        raise PrepareError(f"{tokenizer_file}: not a tokenizer.json ({str(error).splitlines()[0]})") from None
    eos_id = end_of_text_id(tokenizer, eos_id, tokenizer_file)
    try:
        written = write_shards(read_documents(inputs, text_key), tokenizer, output, tokens_per_shard, eos_id)
        # Beside the shards, where train.py looks for the run's tokenizer.
        target = output / TOKENIZER_FILE
        if not (target.exists() and target.samefile(tokenizer_file)):
            shutil.copyfile(tokenizer_file, target)
    except OSError as error:
        raise PrepareError(f"--output {output}: cannot write ({error.strerror or error})") from None
    return written, tokenizer, eos_id


if __name__ == "__main__":
    sys.exit(main())
