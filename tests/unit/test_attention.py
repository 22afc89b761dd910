"""The training model's attention under torch.compile: the traced graph calls scaled_dot_product_attention with no
mask and is_causal=True, which flash attention accepts (an explicit [B, 1, T, T] mask would keep it from running);
and the model with "sdpa" does build that mask when compiled, so this test would see it come back."""
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from configs.model_config import ModelShape
from utils.model import build_model

SHAPE = ModelShape(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   seq_len=32)


def attention_calls_when_compiled(model: torch.nn.Module) -> list[dict[str, object]]:
    """The scaled_dot_product_attention calls of the graphs torch.compile traces for a training forward: whether
    each has a mask, and its is_causal."""
    calls: list[dict[str, object]] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        for node in graph.graph.nodes:
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                calls.append({"mask": node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None),
                              "is_causal": node.kwargs.get("is_causal", False)})
        return graph.forward

    torch._dynamo.reset()
    ids = torch.randint(1, SHAPE.vocab_size, (2, SHAPE.seq_len))
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    return calls


def test_the_compiled_attention_is_causal_with_no_mask() -> None:
    set_seed(0)
    calls = attention_calls_when_compiled(build_model(SHAPE, "pythia"))
    assert len(calls) == SHAPE.num_hidden_layers
    assert all(call["mask"] is None and call["is_causal"] is True for call in calls), calls


def test_transformers_sdpa_would_pass_a_mask_under_compile() -> None:
    # What the causal_sdpa registration avoids: with "sdpa", the traced call carries an explicit mask.
    set_seed(0)
    model = build_model(SHAPE, "pythia")
    model.set_attn_implementation("sdpa")
    calls = attention_calls_when_compiled(model)
    assert len(calls) == SHAPE.num_hidden_layers
    assert all(call["mask"] is not None and call["is_causal"] is False for call in calls), calls
