#!/usr/bin/env python3
"""Which attention kernels train.py's model runs under torch.compile: one profiled training step (bf16 autocast,
compiled as train.py compiles it) of a 2-layer model of the 1.2b preset's width and head size (the kernel choice
depends on those, the dtype, the mask and is_causal, not on the depth), printing the device kernels whose names
say attention (flash, cuDNN, memory-efficient or plain matmuls) with their time. A flash or cuDNN kernel, with no
[B, 1, T, T] mask in the graph, means the causal fast path is taken.

    python bench/gpu_profile.py            # on a GPU (bench/gpu_check.sh runs it)
    python bench/gpu_profile.py --smoke    # on a CPU: the tiny preset, the CPU ops, the same code path
"""
import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import smoke  # noqa: E402
from configs.model_config import resolve_shape  # noqa: E402
from utils.model import build_model  # noqa: E402

ATTENTION_WORDS = ("flash", "fmha", "attention", "attn", "sdpa", "cudnn", "efficient")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1.2b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = smoke.parse_args(parser, {"preset": "tiny", "micro_batch": 2}, argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = replace(resolve_shape(args.preset, {}), num_hidden_layers=args.layers)
    torch.manual_seed(0)
    model = torch.compile(build_model(shape, "pythia", device), backend="inductor" if cuda else "aot_eager")
    ids = torch.randint(0, shape.vocab_size, (args.micro_batch, shape.seq_len), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    for _ in range(2):  # compile and warm up
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        step()
        if cuda:
            torch.cuda.synchronize()
    print(f"{args.preset} width, {args.layers} layers, head size {shape.hidden_size // shape.num_attention_heads}, "
          f"micro-batch {args.micro_batch} x seq {shape.seq_len}, bf16, compiled, on {device}")
    events = [event for event in profiler.key_averages()
              if any(word in event.key.lower() for word in ATTENTION_WORDS)]
    if cuda:  # the device kernels; the aten ops around them are on the CPU side
        events = [event for event in events if event.device_time_total > 0 and not event.key.startswith("aten::")]
    for event in sorted(events, key=lambda e: e.device_time_total if cuda else e.cpu_time_total, reverse=True):
        time_us = event.device_time_total if cuda else event.cpu_time_total
        print(f"attention kernel: {event.key[:110]:110s} {event.count:4d} calls {time_us / 1e3:9.2f} ms")
    if not events:
        print("attention kernel: none found among the profiled events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
