"""The model: built from its shape, initialised as Pythia was.

Pythia-1.4B (EleutherAI/pythia models/1.4B/pythia-1.4b.yml) sets `init_method: small_init` and
`output_layer_init_method: wang_init` in gpt-neox (megatron/model/init_functions.py):

- small_init, N(0, sqrt(2 / (5 d))), for every weight matrix: query_key_value, dense_h_to_4h, and also the
  input embedding (megatron/model/word_embeddings.py passes `init_method` to VocabParallelEmbedding) and the
  final output layer (megatron/model/gpt2_model.py builds ParallelLinearPipe with `init_method=self.init_method`;
  Pythia does not tie it to the embedding, "no-weight-tying": true). We follow that: embed_in and lm_head
  (embed_out in Pythia's released checkpoints) are small_init too; tied, they are one small_init tensor, as
  in gpt-neox.
- wang_init, N(0, 2 / (L sqrt(d))), for the two projections that write into the residual stream in each
  layer, attention.dense and mlp.dense_4h_to_h, so the stream grows less with depth.
- biases zero (Megatron's parallel linear layers), LayerNorms weight 1 and bias 0.

At d = 2048, L = 24 that is 0.0140 and 0.00184, against Hugging Face's N(0, 0.02) for every weight. Both
formulas shrink with the width only: below d = 1000 small_init is wider than 0.02 (the tiny preset, d = 128,
L = 4, gets 0.056 and 0.044).
"""
import math

import torch
from torch import nn
from transformers import AttentionInterface, GPTNeoXForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from configs.model_config import INIT_METHODS, ModelShape, build_model_config

CAUSAL_SDPA = "causal_sdpa"
"""The training model's attention: torch's scaled_dot_product_attention told is_causal=True, with no mask.

Transformers builds no mask for an attention implementation that has no mask function (its masking_utils returns
None for those), and its SDPA then passes is_causal=True. With "sdpa" it would instead check the position ids for
packed sequences: in eager mode a `.all()` that waits for the GPU on every micro-batch, and under torch.compile
(where the check cannot run) an explicit [B, 1, T, T] boolean mask that keeps flash attention from running.
Training samples are packed token streams with no padding, so the causal mask is all there is to it."""
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)

def small_init_std(hidden_size: int) -> float:
    """gpt-neox's small_init (Nguyen & Salazar, Transformers without Tears): sqrt(2 / (5 d))."""
    return math.sqrt(2 / (5 * hidden_size))


def wang_init_std(hidden_size: int, num_layers: int) -> float:
    """gpt-neox's wang_init for the residual-stream output projections: 2 / (L sqrt(d))."""
    return 2 / (num_layers * math.sqrt(hidden_size))


def build_model(shape: ModelShape, init: str = "pythia", device: torch.device | str = "cpu") -> GPTNeoXForCausalLM:
    """A fresh model of `shape` on `device`, initialised by `init` (one of INIT_METHODS), from torch's RNG."""
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {', '.join(INIT_METHODS)}, got {init!r}")
    # Hugging Face initialises while constructing; "pythia" then draws every weight again. That second pass
    # is one normal_ per weight: 3 to 6 s on one CPU core for the 1.2b preset's layers (bench/bench_init.py),
    # memory-bound work a GPU does far faster. Skipping the first pass (transformers' no_init_weights) would
    # also skip tie_weights, and leave torch.empty memory in any tensor a future transformers adds that we
    # do not overwrite: not worth a few seconds.
    with torch.device(device):
        model = GPTNeoXForCausalLM(build_model_config(shape))
    model.set_attn_implementation(CAUSAL_SDPA)
    if init == "pythia":
        init_pythia_(model, shape)
    return model


def init_pythia_(model: GPTNeoXForCausalLM, shape: ModelShape) -> None:
    """Re-initialises every parameter of `model` in place as gpt-neox did for Pythia (see the module docstring).
    A parameter of a module kind this does not know is an error rather than left as it was."""
    small = small_init_std(shape.hidden_size)
    wang = wang_init_std(shape.hidden_size, shape.num_hidden_layers)
    output_projections = {projection for layer in model.gpt_neox.layers
                          for projection in (layer.attention.dense, layer.mlp.dense_4h_to_h)}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(mean=0.0, std=wang if module in output_projections else small)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif next(module.parameters(recurse=False), None) is not None:
                raise TypeError(f"init_pythia_ does not know how to initialise {name} ({type(module).__name__})")


def residual_stream(model: GPTNeoXForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state leaving each layer, the last one before the final LayerNorm: the residual stream whose
    growth with depth the init controls. (output_hidden_states holds the inputs of the layers and then the
    state after the final LayerNorm, whose std is about 1 whatever the init, so it misses the last layer's.)"""
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda module, args, output: captured.append(output))
             for layer in model.gpt_neox.layers]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured
