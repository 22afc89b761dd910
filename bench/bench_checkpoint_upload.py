#!/usr/bin/env python3
"""What checkpoint uploads cost the training loop, how fast each format goes, and what a restore holds on disk.

    python bench/bench_checkpoint_upload.py                   # formats, streams and restores on 512 MB, then the loop
    python bench/bench_checkpoint_upload.py --size-mb 2048 --no-emulator
    python bench/bench_checkpoint_upload.py --skip-formats --skip-loop --streams 1 4 16   # streams and restores only
    python bench/bench_checkpoint_upload.py --smoke           # all sections on 4 MB and a 2-layer model: seconds

1. Archive formats: a synthetic checkpoint shaped like a real one (float32 weights ~ N(0, 0.02), Adam's
   exp_avg and exp_avg_sq) is streamed as tar, tar.zst and tar.gz (a) into a crc32c counter only (the
   archiver's own speed on one core), (b) into a local-folder destination and (c) into fake-gcs-server
   on 127.0.0.1 (the emulator stands in for the network; real GCS differs). MB/s are checkpoint bytes
   per second; the ratio is archive size / checkpoint size.
2. Streams: the same checkpoint uploaded in the files layout (each file an object, large files in parts of
   --part-mb) with 1 and with N concurrent streams, to a local-folder destination and to the emulator (MB/s
   of checkpoint bytes, verified). Then restores from the emulator (files layout and tar.zst, as a resume
   does them) with the peak of the bytes on the restore disk, sampled every few milliseconds, against the
   checkpoint size: a restore that wrote the archive first would peak at about twice the checkpoint.
3. The loop: a GPT-NeoX model trains on random tokens on this machine; each checkpoint is saved with
   utils/checkpoint_utils.save_checkpoint and handed to the Uploader (local-folder destination). It reports
   the time the loop is blocked per checkpoint (the local save plus the hand-over) and the mean step time
   with an upload in flight against without one.
This prints figures; it is not a test.
"""
import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

from bench import smoke  # noqa: E402
from configs.model_config import build_model_config, resolve_shape  # noqa: E402
from configs.training_config import ARCHIVE_FORMATS  # noqa: E402
from conftest import disk_peak  # noqa: E402  (tests/: the same sampler the restore test uses)
from utils.checkpoints.folders import checkpoint_name
from utils.checkpoints.writer import save_checkpoint
from utils.uploads.destination import download_checkpoint, open_destination
from utils.uploads.formats import HashingWriter, folder_size, write_archive
from utils.uploads.uploader import Uploader, UploadSettings

SMOKE_DEFAULTS = {"size_mb": 4, "streams": [1, 2], "part_mb": 1, "hidden": 32, "layers": 2, "steps": 3}


def synthetic_checkpoint(folder: Path, size_mb: int) -> Path:
    """model.safetensors-sized weights (1/3) and optimizer state (2/3) as raw float32 files."""
    rng = np.random.default_rng(0)
    path = folder / checkpoint_name(0, 100, 0)
    path.mkdir(parents=True)
    floats = size_mb * 1_000_000 // 4 // 3
    (path / "model.safetensors").write_bytes((rng.standard_normal(floats, dtype=np.float32) * 0.02).tobytes())
    exp_avg = rng.standard_normal(floats, dtype=np.float32) * 1e-3
    (path / "optimizer.bin").write_bytes(exp_avg.tobytes() + (exp_avg * exp_avg).tobytes())
    (path / "metadata.json").write_text("{}")
    return path


def start_emulator(folder: Path) -> Any:
    from gcs_emulator import GCSEmulator
    server = GCSEmulator(folder)
    server.start()
    server.create_bucket("bench")
    os.environ.update(server.env)
    os.environ["GCS_RETRY_DEADLINE_S"] = "120"  # the tests' short deadline is for a stopped emulator
    os.environ["GCS_TIMEOUT_S"] = "60"
    return server


def bench_formats(size_mb: int, emulator: bool, work: Path) -> None:
    source = synthetic_checkpoint(work / "formats", size_mb)
    total = folder_size(source)
    print(f"\n1. Archive formats on a {total / 1e6:,.0f} MB synthetic checkpoint (MB/s of checkpoint bytes)")
    server = start_emulator(work / "gcs-formats") if emulator else None
    print(f"{'format':8s} {'ratio':>6s} {'archive only':>13s} {'to local folder':>16s} {'to emulator':>12s}")
    try:
        for archive_format in ARCHIVE_FORMATS[1:]:  # the archives; the files layout is section 2
            sink = HashingWriter()
            start = time.perf_counter()
            write_archive(source, sink, archive_format)
            archive_only = total / 1e6 / (time.perf_counter() - start)
            rates = []
            for destination in [str(work / f"dest-{archive_format}")] + (["gs://bench/ck"] if server else []):
                uploader = Uploader(open_destination(destination), source.parent,
                                    UploadSettings(archive_format, background=False))
                start = time.perf_counter()
                uploader.submit(source)
                rates.append(total / 1e6 / (time.perf_counter() - start))
                assert uploader.is_verified(source.name)
                (source.parent / "uploads.json").unlink()
            emulator_rate = f"{rates[1]:12,.0f}" if server else f"{'-':>12s}"
            print(f"{archive_format:8s} {sink.size / total:6.3f} {archive_only:13,.0f} {rates[0]:16,.0f} {emulator_rate}")
    finally:
        if server:
            server.stop()


def timed_upload(destination: str, source: Path, archive_format: str, streams: int, part_mb: int) -> float:
    """MB/s of one verified upload of `source` (its record removed afterwards, so the next one uploads anew)."""
    settings = UploadSettings(archive_format, background=False, streams=streams, part_bytes=part_mb * 1024 * 1024)
    uploader = Uploader(open_destination(destination), source.parent, settings)
    start = time.perf_counter()
    uploader.submit(source)
    seconds = time.perf_counter() - start
    assert uploader.is_verified(source.name)
    (source.parent / "uploads.json").unlink()
    return folder_size(source) / 1e6 / seconds


def bench_streams(size_mb: int, streams: list[int], part_mb: int, emulator: bool, work: Path) -> None:
    source = synthetic_checkpoint(work / "streams", size_mb)
    total = folder_size(source)
    print(f"\n2. Files layout on a {total / 1e6:,.0f} MB synthetic checkpoint, parts of {part_mb} MiB "
          f"(MB/s of checkpoint bytes, verified)")
    server = start_emulator(work / "gcs-streams") if emulator else None
    try:
        print(f"{'streams':>8s} {'to local folder':>16s} {'to emulator':>12s}")
        for count in streams:
            local = timed_upload(str(work / f"dest-files-{count}"), source, "files", count, part_mb)
            shutil.rmtree(work / f"dest-files-{count}")
            remote = f"{timed_upload(f'gs://bench/streams{count}', source, 'files', count, part_mb):12,.0f}" \
                if server else f"{'-':>12s}"
            print(f"{count:8d} {local:16,.0f} {remote}")
        if server is None:
            return
        print(f"\n   Restores from the emulator ({max(streams)} streams for the files layout), as a resume does them:")
        print(f"   {'format':8s} {'MB/s':>6s} {'disk peak':>10s} {'checkpoint':>11s} {'peak / checkpoint':>18s}")
        for archive_format, url in (("files", f"gs://bench/streams{max(streams)}"), ("tar.zst", "gs://bench/restore")):
            storage = open_destination(url)
            if archive_format != "files":
                Uploader(storage, source.parent, UploadSettings(archive_format, background=False)).submit(source)
                (source.parent / "uploads.json").unlink()
            target = work / f"restore-{archive_format}"
            target.mkdir()
            obj = storage.stat(f"{source.name}.files.json" if archive_format == "files" else f"{source.name}.tar.zst")
            start = time.perf_counter()
            peak, _ = disk_peak(target, lambda: download_checkpoint(storage, obj, target, streams=max(streams)))
            rate = total / 1e6 / (time.perf_counter() - start)
            print(f"   {archive_format:8s} {rate:6,.0f} {peak / 1e6:8,.0f} MB {total / 1e6:8,.0f} MB {peak / total:18.3f}")
            shutil.rmtree(target)
    finally:
        if server:
            server.stop()


def bench_loop(hidden: int, layers: int, steps: int, archive_format: str, work: Path) -> None:
    shape = resolve_shape("tiny", {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 8,
                                   "intermediate_size": 4 * hidden, "seq_len": 256, "vocab_size": 8192})
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = GPTNeoXForCausalLM(build_model_config(shape)).to(accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    tokens = torch.randint(0, shape.vocab_size, (4, shape.seq_len), device=accelerator.device)
    checkpoints = work / "loop"
    uploader = Uploader(open_destination(str(work / "loop-uploads")), checkpoints, UploadSettings(archive_format))
    params = sum(p.numel() for p in model.parameters())

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        step()  # warm-up
    quiet = [step() for _ in range(steps)]
    blocked, saves, in_flight = [], [], []
    for index in range(8):
        start = time.perf_counter()
        path = save_checkpoint(accelerator, checkpoints, checkpoint_name(0, index, 0), {"metadata.json": {}})
        saved = time.perf_counter()
        uploader.submit(path)
        blocked.append(time.perf_counter() - start)
        saves.append(saved - start)
        while uploader.unfinished():
            in_flight.append(step())
    assert uploader.wait(600) == [] and all(uploader.is_verified(checkpoint_name(0, i, 0)) for i in range(8))
    size = folder_size(checkpoints / checkpoint_name(0, 0, 0))
    print(f"\n3. The loop: GPT-NeoX {params / 1e6:,.1f} M parameters on {accelerator.device}, "
          f"{size / 1e6:,.0f} MB checkpoint, archive {archive_format}, torch threads {torch.get_num_threads()}")
    print(f"   blocked per checkpoint: {statistics.mean(blocked):.3f} s (local save {statistics.mean(saves):.3f} s, "
          f"hand-over {statistics.mean(blocked) - statistics.mean(saves):.4f} s)")
    print(f"   step time: {statistics.mean(quiet) * 1e3:,.1f} ms without an upload, "
          f"{statistics.mean(in_flight) * 1e3:,.1f} ms with one in flight ({len(in_flight)} steps) -> ratio "
          f"{statistics.mean(in_flight) / statistics.mean(quiet):.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=512, help="synthetic checkpoint size for the format table")
    parser.add_argument("--no-emulator", action="store_true", help="skip the fake-gcs-server column")
    parser.add_argument("--hidden", type=int, default=256, help="model width for the loop")
    parser.add_argument("--layers", type=int, default=4, help="model depth for the loop")
    parser.add_argument("--steps", type=int, default=10, help="steps timed without an upload")
    parser.add_argument("--archive-format", choices=ARCHIVE_FORMATS, default="files", help="format for the loop")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="stream counts to compare")
    parser.add_argument("--part-mb", type=int, default=32, help="part size of the files layout in MiB")
    parser.add_argument("--skip-streams", action="store_true", help="skip the streams and restore figures")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads for the loop (default: torch's choice)")
    parser.add_argument("--skip-formats", action="store_true", help="skip the archive formats")
    parser.add_argument("--skip-loop", action="store_true", help="skip the training loop")
    args = smoke.parse_args(parser, SMOKE_DEFAULTS, argv)
    logging.basicConfig(level=logging.WARNING)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as folder:
        if not args.skip_formats:
            bench_formats(args.size_mb, not args.no_emulator, Path(folder))
        if not args.skip_streams:
            bench_streams(args.size_mb, args.streams, args.part_mb, not args.no_emulator, Path(folder))
        if not args.skip_loop:
            bench_loop(args.hidden, args.layers, args.steps, args.archive_format, Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
