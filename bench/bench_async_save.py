#!/usr/bin/env python3
"""Seconds the training loop is blocked per checkpoint save, synchronous against asynchronous (async_save).

    python bench/bench_async_save.py                       # a ~1.3 GB state (model + AdamW) on the CPU
    python bench/bench_async_save.py --hidden 2048 --layers 24 --vocab 50257   # the 1.2b preset (17 GB; a GPU)
    accelerate launch --multi_gpu --num_processes 2 bench/bench_async_save.py --fsdp   # sharded over processes
    python bench/bench_async_save.py --smoke              # a 2 MB state, two saves per mode: seconds

It builds the model and AdamW (one step, so the optimizer state exists), then saves it through the run's
Checkpointer, `--saves` times in each mode, into a temporary folder on the disk given by --dir. Blocked is
what the loop waits for; written is how long the checkpoint takes to appear (for async, in the background).
With --fsdp the state is sharded over the launched processes (on CPU processes through tests/e2e/cpu_fsdp.py) and
each writes its shards with torch.distributed.checkpoint, synchronously or with its async_save.
"""
import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import broadcast_object_list  # noqa: E402
from cpu_fsdp import enable_fsdp_on_cpu  # noqa: E402

from bench import smoke  # noqa: E402
from configs.training_config import TrainingConfig  # noqa: E402
from utils.accelerator import fsdp_plugin  # noqa: E402
from utils.checkpoint_utils import Checkpointer
from utils.data.order import DataPosition, StreamSpec
from utils.display import fmt_bytes
from utils.model import build_model  # noqa: E402
from utils.train_state import (
    TrainingMetrics,
    TrainState,  # noqa: E402
)
from utils.training_utils import make_optimizer
from utils.uploads.formats import folder_size

SMOKE_DEFAULTS = {"hidden": 64, "layers": 2, "vocab": 256, "saves": 2}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--saves", type=int, default=3, help="saves per mode")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoints go")
    parser.add_argument("--fsdp", action="store_true", help="shard the state over the launched processes")
    args = smoke.parse_args(parser, SMOKE_DEFAULTS, argv)

    model_fields = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": 16,
                    "intermediate_size": 4 * args.hidden, "seq_len": 128, "vocab_size": args.vocab}
    cuda = torch.cuda.is_available()
    if args.fsdp and not cuda:
        enable_fsdp_on_cpu()
    accelerator = Accelerator(cpu=not cuda, fsdp_plugin=fsdp_plugin(False, "no") if args.fsdp else None)
    shape = TrainingConfig(model_preset="tiny", model=model_fields).model_shape()
    model = build_model(shape, "pythia", accelerator.device)
    parameters = sum(p.numel() for p in model.parameters())
    config = TrainingConfig(model_preset="tiny", model=model_fields, max_steps=10**6, save_steps=1,
                            keep_checkpoints=1, data=str(args.dir), fsdp=args.fsdp)
    optimizer, scheduler = make_optimizer(model, config, fused=cuda)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    input_ids = torch.randint(0, args.vocab, (1, 128), device=accelerator.device)
    accelerator.backward(model(input_ids=input_ids, labels=input_ids).loss)
    optimizer.step()
    spec = StreamSpec(("bench",), seq_len=128, seed=0, vocab_size=args.vocab, eos_token_id=0, pad_token_id=None,
                      shuffle_window_shards=1)

    report = print if accelerator.is_main_process else (lambda line: None)
    sharded = f", sharded over {accelerator.num_processes} processes (FSDP)" if args.fsdp else ""
    report(f"device {accelerator.device}, {parameters:,} parameters{sharded}, disk {args.dir}")
    step = 0
    for mode in (False, True):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-async-save-") as own_folder:
            folder = broadcast_object_list([own_folder])[0]  # the main process's: one checkpoint folder for all
            run = TrainingConfig(**{**config.to_dict(), "checkpoint_dir": folder, "async_save": mode})
            checkpointer = Checkpointer(run, shape, accelerator, remote=None, shared_disk=True)
            checkpointer.start(lambda record: None, (model, optimizer, scheduler), None)
            blocked, written = [], []
            for _ in range(args.saves):
                step += 1
                state = TrainState(spec, TrainingMetrics(), step=step, position=DataPosition())
                started = time.perf_counter()
                checkpointer.save(state, "benchmark")
                blocked.append(time.perf_counter() - started)
                checkpointer.wait_for_write()
                written.append(time.perf_counter() - started)
            checkpointer.finish(interrupted=lambda: False)  # no write in flight: its host copies are released
            accelerator.wait_for_everyone()  # every process's shards are in
            if accelerator.is_main_process:
                size = folder_size(Path(folder) / state.checkpoint_name)
                report(f"{'async' if mode else 'sync ':5s} checkpoint {fmt_bytes(size)}: blocked per save "
                       f"{statistics.median(blocked):.2f} s (min {min(blocked):.2f}), written after "
                       f"{statistics.median(written):.2f} s")
            accelerator.wait_for_everyone()
            shutil.rmtree(own_folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
