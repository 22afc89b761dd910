#!/usr/bin/env python3
"""Seconds the training loop is blocked per checkpoint save, synchronous against asynchronous (async_save).

    python bench/bench_async_save.py                       # a ~1.3 GB state (model + AdamW) on the CPU
    python bench/bench_async_save.py --hidden 2048 --layers 24 --vocab 50257   # the 1.2b preset (17 GB; a GPU)

It builds the model and AdamW (one step, so the optimizer state exists), then saves it through the run's
Checkpointer, `--saves` times in each mode, into a temporary folder on the disk given by --dir. Blocked is
what the loop waits for; written is how long the checkpoint takes to appear (for async, in the background).
"""
import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from configs.training_config import TrainingConfig  # noqa: E402
from utils.archive import folder_size, human_size  # noqa: E402
from utils.checkpointer import Checkpointer  # noqa: E402
from utils.data_utils import DataPosition, StreamSpec  # noqa: E402
from utils.metrics import TrainingMetrics  # noqa: E402
from utils.model import build_model  # noqa: E402
from utils.train_state import TrainState  # noqa: E402
from utils.training_utils import make_optimizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--saves", type=int, default=3, help="saves per mode")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoints go")
    args = parser.parse_args()

    model_fields = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": 16,
                    "intermediate_size": 4 * args.hidden, "seq_len": 128, "vocab_size": args.vocab}
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    shape = TrainingConfig(model_preset="tiny", model=model_fields).model_shape()
    model = build_model(shape, "pythia", accelerator.device)
    config = TrainingConfig(model_preset="tiny", model=model_fields, max_steps=10**6, save_steps=1,
                            keep_checkpoints=1, data=str(args.dir))
    optimizer, scheduler = make_optimizer(model, config, fused=accelerator.device.type == "cuda")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    input_ids = torch.randint(0, args.vocab, (1, 128), device=accelerator.device)
    accelerator.backward(model(input_ids=input_ids, labels=input_ids).loss)
    optimizer.step()
    spec = StreamSpec(("bench",), seq_len=128, seed=0, vocab_size=args.vocab, eos_token_id=0, pad_token_id=None,
                      shuffle_window_shards=1)

    print(f"device {accelerator.device}, {sum(p.numel() for p in model.parameters()):,} parameters, disk {args.dir}")
    step = 0
    for mode in (False, True):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-async-save-") as folder:
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
            size = folder_size(Path(folder) / state.checkpoint_name)
            print(f"{'async' if mode else 'sync ':5s} checkpoint {human_size(size)}: blocked per save "
                  f"{statistics.median(blocked):.2f} s (min {min(blocked):.2f}), written after "
                  f"{statistics.median(written):.2f} s")
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
