#!/usr/bin/env python3
"""What Pythia's initialisation changes at init, against Hugging Face's N(0, 0.02) (utils/model.py).

    python bench/bench_init.py                  # the 1.2b preset's layers (d 2048, L 24), vocab 512, 128 tokens
    python bench/bench_init.py --hidden-size 512 --layers 8 --heads 8
    python bench/bench_init.py --smoke          # d 64, L 4, vocab 64, 16 tokens: seconds

The 1.2b preset with the width, depth and heads of the flags (feed-forward 4 x width), a vocabulary of `--vocab`
and one random sample of `--tokens` tokens; at the default shape a run takes about 50 s on one CPU core and
5 GB of memory (one model at a time).

For each init ("hf", then "pythia") it builds the model with utils/model.build_model from the same seed and
reports: the build time (construction, plus the second pass that draws Pythia's weights), the std of each
weight kind (measured, over all layers, and the formula), and the std of the residual stream after layers
L/4, L/2, 3L/4 and L (the last one before the final LayerNorm) on the random sample. The vocabulary and
sequence are shrunk so that it runs on a CPU: neither changes the layers, and the embedding's std does not
depend on the vocabulary size. Prints figures; it is not a test.
"""
import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

from bench import smoke  # noqa: E402
from configs.model_config import ModelShape, resolve_shape  # noqa: E402
from utils.model import INIT_METHODS, build_model, residual_stream, small_init_std, wang_init_std  # noqa: E402

WEIGHT_KINDS = ("embed_in.weight", "attention.query_key_value.weight", "mlp.dense_h_to_4h.weight",
                "attention.dense.weight", "mlp.dense_4h_to_h.weight", "lm_head.weight")
OUTPUT_PROJECTIONS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
SMOKE_DEFAULTS = {"hidden_size": 64, "layers": 4, "heads": 4, "vocab": 64, "tokens": 16}


class Measured(NamedTuple):
    build_s: float
    weight_stds: dict[str, float]
    """By weight kind."""
    residual_stds: dict[int, float]
    """By depth: the std of the residual stream after that many layers."""


def formula_std(init: str, kind: str, shape: ModelShape) -> float:
    if init == "hf":
        return 0.02
    if kind in OUTPUT_PROJECTIONS:
        return wang_init_std(shape.hidden_size, shape.num_hidden_layers)
    return small_init_std(shape.hidden_size)


def weight_std(model: GPTNeoXForCausalLM, kind: str) -> float:
    """The std of all weights of a kind pooled over the layers (from per-tensor variances: no 1.6 GB concat)."""
    tensors = [p for name, p in model.named_parameters() if name.endswith(kind)]
    count = sum(t.numel() for t in tensors)
    return math.sqrt(sum(t.var().item() * t.numel() for t in tensors) / count)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128, help="sequence length of the one random sample")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1)
    args = smoke.parse_args(parser, SMOKE_DEFAULTS, argv)
    torch.set_num_threads(args.threads)
    shape = resolve_shape("1.2b", {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers,
                                   "num_attention_heads": args.heads, "intermediate_size": 4 * args.hidden_size,
                                   "vocab_size": args.vocab, "seq_len": args.tokens, "eos_token_id": 0})
    depths = sorted({max(1, args.layers * q // 4) for q in (1, 2, 3, 4)})
    set_seed(args.seed)
    input_ids = torch.randint(0, shape.vocab_size, (1, shape.seq_len))
    print(f"d {shape.hidden_size}, L {shape.num_hidden_layers}, heads {shape.num_attention_heads}, "
          f"ffn {shape.intermediate_size}, vocab {shape.vocab_size}, {shape.seq_len} tokens, "
          f"torch {torch.__version__}, {args.threads} thread(s)")

    results: dict[str, Measured] = {}
    for init in INIT_METHODS[::-1]:  # hf first: the baseline
        set_seed(args.seed)
        start = time.perf_counter()
        model = build_model(shape, init, torch.device("cpu"))
        build_s = time.perf_counter() - start
        stream = residual_stream(model, input_ids)
        results[init] = Measured(build_s, {kind: weight_std(model, kind) for kind in WEIGHT_KINDS},
                                 {depth: stream[depth - 1].std().item() for depth in depths})
        del model  # one model in memory at a time (4.8 GB each at the default shape)

    print(f"\n{'':36s} {'hf':>9s} {'formula':>9s} {'pythia':>9s} {'formula':>9s} {'hf/pythia':>9s}")
    for kind in WEIGHT_KINDS:
        hf, pythia = results["hf"].weight_stds[kind], results["pythia"].weight_stds[kind]
        print(f"{'std ' + kind:36s} {hf:9.5f} {formula_std('hf', kind, shape):9.5f} {pythia:9.5f} "
              f"{formula_std('pythia', kind, shape):9.5f} {hf / pythia:9.2f}")
    for depth in depths:
        hf, pythia = results["hf"].residual_stds[depth], results["pythia"].residual_stds[depth]
        label = f"residual stream after layer {depth}"
        print(f"{label:36s} {hf:9.3f} {'':9s} {pythia:9.3f} {'':9s} {hf / pythia:9.2f}")
    print(f"{'build time (s)':36s} {results['hf'].build_s:9.1f} {'':9s} {results['pythia'].build_s:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
