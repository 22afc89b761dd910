"""Model architecture presets for GPT-NeoX, and the one function that turns them into a config.

A training config names a preset and may override any field of it (vocab size, sequence length,
layers, ...), so data made with any tokenizer can be trained on.
"""
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where it is built: the tools read configs without transformers (and torch) loaded
    from transformers import GPTNeoXConfig

# Embedding tables padded to a multiple of this many rows run faster on tensor cores.
VOCAB_PAD_MULTIPLE = 128
INIT_METHODS = ("pythia", "hf")
"""Initialisations utils/model.build_model knows: "pythia" (small_init + wang_init, as gpt-neox trained Pythia)
or "hf" (Hugging Face's N(0, 0.02) for every weight)."""


@dataclass(frozen=True)
class ModelShape:
    """The fields of a GPT-NeoX architecture that a run may choose."""

    vocab_size: int
    """Tokens the tokenizer produces; padded up to a multiple of 128 for the embedding tables."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    """Width of the feed-forward layer (4 x hidden in Pythia)."""
    seq_len: int
    """Tokens per training sample; also the model's max_position_embeddings."""
    rotary_pct: float = 0.25
    """Fraction of each head's dimensions that get rotary position embeddings."""
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int | None = 0
    """End-of-text id written between packed documents; None packs documents back to back."""


PRESETS: dict[str, ModelShape] = {
    # Pythia-1.4B: 1,414,647,808 parameters with the vocabulary padded to 50,304. The original data
    # was tokenized with the GPT-2 tokenizer (50,257 ids), whose <|endoftext|> is 50256.
    "1.2b": ModelShape(vocab_size=50257, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=8192, seq_len=2048, eos_token_id=50256),
    # A few million parameters: the CPU smoke run and the tests. Vocab matches the sample tokenizer.
    "tiny": ModelShape(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=512, seq_len=256),
}


class ModelConfigError(ValueError):
    """A preset name or override that does not describe a model."""


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def resolve_shape(preset: str, overrides: dict[str, Any] | None = None) -> ModelShape:
    """The preset with the overrides applied; an unknown preset or field is an error naming it."""
    if preset not in PRESETS:
        raise ModelConfigError(f"unknown model preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    overrides = dict(overrides or {})
    known = {f.name for f in fields(ModelShape)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelConfigError(f"unknown model field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    shape = replace(PRESETS[preset], **overrides)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "seq_len"):
        value = getattr(shape, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelConfigError(f"model.{name} must be a positive integer, got {value!r}")
    if shape.hidden_size % shape.num_attention_heads:
        raise ModelConfigError(f"model.hidden_size {shape.hidden_size} is not divisible by "
                               f"num_attention_heads {shape.num_attention_heads}")
    if not 0.0 <= shape.rotary_pct <= 1.0:
        raise ModelConfigError(f"model.rotary_pct must be in [0, 1], got {shape.rotary_pct!r}")
    if shape.eos_token_id is not None and not 0 <= shape.eos_token_id < shape.vocab_size:
        raise ModelConfigError(f"model.eos_token_id {shape.eos_token_id} is outside the vocabulary "
                               f"(vocab_size {shape.vocab_size})")
    return shape


def build_model_config(shape: ModelShape) -> "GPTNeoXConfig":
    """The Hugging Face config for a shape, with SDPA attention and no dropout (as in Pythia)."""
    from transformers import GPTNeoXConfig  # seconds of imports (torch too), for the commands that build a model

    return GPTNeoXConfig(
        vocab_size=padded_vocab_size(shape.vocab_size),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.seq_len,
        rotary_pct=shape.rotary_pct,
        use_parallel_residual=shape.use_parallel_residual,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=shape.eos_token_id,
        eos_token_id=shape.eos_token_id,
        attn_implementation="sdpa",
        use_cache=False,
    )


def shape_as_dict(shape: ModelShape) -> dict[str, Any]:
    return asdict(shape)
