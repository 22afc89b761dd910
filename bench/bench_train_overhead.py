#!/usr/bin/env python3
"""How much train.py adds to the bare compute of a training step, and how it compares with the Hugging Face
Trainer, on the same model, batch, optimizer and data (CPU).

    python bench/bench_train_overhead.py                 # tiny preset, micro-batch 8, 4 rounds x 20 steps
    python bench/bench_train_overhead.py --rounds 6 --steps 30 --threads 2 --json out.json
    python bench/bench_train_overhead.py --smoke --data DIR   # one round of 6 steps at micro-batch 2: seconds

Three loops, interleaved round by round so that drifting machine load hits each alike:
  train.py  the real script, as a subprocess on the sample shards; its step time comes from the
            wall-clock `elapsed_s` of consecutive metrics.jsonl lines (logging, data loading and all)
  bare      the same model, AdamW, LR schedule and gradient clipping on the batches train.py trains on, read
            in advance through train.py's own data set-up (utils/data_utils.py)
  trainer   transformers.Trainer on the same samples (AdamW, cosine schedule, clipping, no saving)
All three are timed as mean step times over windows of `--log-every` steps (train.py's logging windows;
those overlapping the first `--warmup` steps are dropped). Two ratios are reported: of the fastest window
of each loop (the least disturbed by other load on the machine) and the median of the per-round ratios of
medians. One torch thread by default: on a shared machine, OpenMP's spinning threads make multi-threaded
timings swing tenfold. Prints a Markdown table for bench/RESULTS.md. Targets: train.py / bare <= 1.03,
train.py / trainer <= 1.0.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import GPTNeoXForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from bench import smoke  # noqa: E402
from configs.model_config import build_model_config  # noqa: E402
from configs.training_config import TrainingConfig  # noqa: E402
from utils.data.order import DataPosition
from utils.data_utils import open_data
from utils.training_utils import lr_multiplier, parameter_groups

SMOKE_DEFAULTS = {"batch": 2, "steps": 6, "warmup": 2, "log_every": 2, "rounds": 1}


def bench_config(args: argparse.Namespace, folder: Path) -> TrainingConfig:
    return TrainingConfig(model_preset=args.preset, data=str(args.data), max_steps=args.steps,
                          per_device_train_batch_size=args.batch, learning_rate=1e-3, warmup_steps=5,
                          save_steps=10 * args.steps, logging_steps=args.log_every, mixed_precision="no",
                          checkpoint_dir=str(folder / "checkpoints"), log_dir=str(folder / "logs"),
                          prefetch_batches=8)


def real_batches(config: TrainingConfig, count: int) -> list[torch.Tensor]:
    """The first `count` micro-batches train.py trains on, from its own data set-up (so that this benchmark
    follows when the stream's definition changes)."""
    accelerator = Accelerator(cpu=True)
    loader = open_data(config, config.model_shape(), accelerator, None).loader(DataPosition(), accelerator,
                                                                               config.per_device_train_batch_size)
    try:
        return [next(loader).input_ids for _ in range(count)]
    finally:
        loader.close()


def time_train_py(config: TrainingConfig, folder: Path) -> list[float]:
    """Per-step seconds of train.py, from the wall clock between its metrics lines."""
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed: {result.stderr[-2000:]}")
    lines = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    records = [line for line in lines if "tokens_per_sec" in line]  # the training lines, not save events
    return [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]) for a, b in zip(records, records[1:])]


def new_model(config: TrainingConfig) -> GPTNeoXForCausalLM:
    torch.manual_seed(config.seed)
    return GPTNeoXForCausalLM(build_model_config(config.model_shape())).train()


def windows(step_times: list[float], size: int) -> list[float]:
    """Mean step time of each run of `size` consecutive steps, like train.py's logging windows."""
    return [statistics.fmean(step_times[i:i + size]) for i in range(0, len(step_times) - size + 1, size)]


def time_bare(config: TrainingConfig, batches: list[torch.Tensor]) -> list[float]:
    """The same step as train.py's, and nothing else."""
    model = new_model(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup_steps=config.warmup_steps, schedule_steps=config.schedule_steps,
        min_lr_ratio=config.min_lr_ratio))
    times = []
    for input_ids in batches:
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 (Trainer's callback signature)
        self.ends.append(time.perf_counter())


def time_trainer(config: TrainingConfig, batches: list[torch.Tensor], folder: Path) -> list[float]:
    samples = [{"input_ids": row, "labels": row} for batch in batches for row in batch]
    arguments = TrainingArguments(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=config.per_device_train_batch_size,
        max_steps=len(batches), learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm, warmup_steps=config.warmup_steps, lr_scheduler_type="cosine",
        optim="adamw_torch", logging_steps=config.logging_steps, save_strategy="no", report_to="none",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=config.seed)
    clock = StepClock()
    trainer = Trainer(model=new_model(config), args=arguments, train_dataset=samples, callbacks=[clock])
    clock.ends = [time.perf_counter()]
    trainer.train()
    return [b - a for a, b in zip(clock.ends, clock.ends[1:])]


def min_steps(warmup: int, log_every: int) -> int:
    """The fewest --steps that leave every loop a timed window: the windows overlapping the warmup are dropped,
    and train.py's first window (from its start to its first metrics line) is never timed."""
    skip = -(-warmup // log_every)
    return (skip + 2) * log_every


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, in one line, or None."""
    for name in ("batch", "steps", "log_every", "rounds", "threads"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    needed = min_steps(args.warmup, args.log_every)
    if args.steps < needed:
        return (f"--steps {args.steps} leaves no timed window: with --warmup {args.warmup} and --log-every "
                f"{args.log_every} it must be at least {needed} (or lower --warmup / --log-every)")
    if not sorted(args.data.glob("tokenized_*.npz")):
        return f"no shards in {args.data}; run: python scripts/prepare_data.py --sample"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20,
                        help="steps per loop and round; at least (ceil(warmup / log-every) + 2) x log-every")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--log-every", type=int, default=5, help="train.py's logging_steps (timing window)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in every loop")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "sample")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = smoke.parse_args(parser, SMOKE_DEFAULTS, argv)
    problem = check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    skip = -(-args.warmup // args.log_every)  # whole logging windows that overlap the warmup
    samples: dict[str, list[float]] = {"train.py": [], "bare": [], "trainer": []}
    ratios: dict[str, list[float]] = {"bare": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            folder = Path(tmp) / f"round{round_index}"
            folder.mkdir()
            config = bench_config(args, folder)
            batches = real_batches(config, args.steps)
            # All three as mean step times over the same windows of log_every steps as train.py's log.
            this_round = {
                "train.py": time_train_py(config, folder)[skip:],
                "bare": windows(time_bare(config, batches), args.log_every)[skip:],
                "trainer": windows(time_trainer(config, batches, folder), args.log_every)[skip:]}
            medians = {name: statistics.median(times) for name, times in this_round.items()}
            for name, times in this_round.items():
                samples[name] += times
            for name in ratios:
                ratios[name].append(medians["train.py"] / medians[name])
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{name} {value * 1000:.1f} ms" for name, value in medians.items()), flush=True)

    median = {name: statistics.median(times) for name, times in samples.items()}
    fastest = {name: min(times) for name, times in samples.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{args.threads} torch thread(s)", "torch": torch.__version__,
        "transformers": transformers.__version__, "preset": args.preset, "micro_batch": args.batch,
        "seq_len": config.model_shape().seq_len, "steps_per_round": args.steps, "rounds": args.rounds,
        "window_steps": args.log_every, "median_step_s": median, "fastest_window_step_s": fastest,
        "train_over_bare": {"fastest": fastest["train.py"] / fastest["bare"],
                            "median_of_rounds": statistics.median(ratios["bare"])},
        "train_over_trainer": {"fastest": fastest["train.py"] / fastest["trainer"],
                               "median_of_rounds": statistics.median(ratios["trainer"])},
        "per_round_ratios": ratios,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"\n{result['date']}, {result['machine']}, torch {result['torch']}, transformers {result['transformers']}; "
          f"{args.preset} preset, micro-batch {args.batch} x seq {result['seq_len']}, fp32, "
          f"{args.rounds} rounds x {args.steps} steps, windows of {args.log_every} steps (first {skip} dropped)\n")
    print("| loop | fastest window (ms/step) | median (ms/step) | train.py / loop, fastest | "
          "train.py / loop, median of rounds | per round |\n|---|---:|---:|---:|---:|---|")
    for name in samples:
        per_round = ", ".join(f"{r:.3f}" for r in ratios.get(name, []))
        by_rounds = f"{statistics.median(ratios[name]):.3f}" if name in ratios else "-"
        print(f"| {name} | {fastest[name] * 1000:.1f} | {median[name] * 1000:.1f} | "
              f"{fastest['train.py'] / fastest[name]:.3f} | {by_rounds} | {per_round} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
