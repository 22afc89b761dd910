"""The optimizer and its schedule: AdamW over two parameter groups, and the warmup-cosine learning rate as a function
of the optimizer step."""
import math
from functools import partial
from typing import Any

import torch
from accelerate.utils import DistributedType

from configs.training_config import TrainingConfig


def lr_multiplier(step: int, warmup_steps: int, schedule_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak learning rate for optimizer step `step` (0-based): linear warmup, then
    cosine decay to min_lr_ratio at schedule_steps, flat after. It depends on the optimizer step
    only, so a run on N processes follows the same schedule as a run on one."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= schedule_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, schedule_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: not on biases, LayerNorms or the input embedding."""
    input_embedding = model.get_input_embeddings().weight
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim >= 2 and parameter is not input_embedding:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [{"params": params, "weight_decay": decay_of_group}
            for params, decay_of_group in zip((decay, no_decay), group_weight_decays(weight_decay))]


def group_weight_decays(weight_decay: float) -> tuple[float, float]:
    """The weight decay of parameter_groups' two groups: [weight matrices, everything else]."""
    return weight_decay, 0.0


OPTIMIZER_GROUPS_FILE = "optimizer_groups.json"
"""In every checkpoint: the optimizer's parameter groups by parameter name (optimizer_layout)."""


def optimizer_layout(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What optimizer_groups.json records: the parameters (by name) of each of the optimizer's groups, in order,
    and the group's hyperparameters. optimizer.bin numbers the parameters by their place in the groups, so a
    loader that is not this project builds the same AdamW from this before accelerator.load_state. No "lr": the
    schedule (scheduler.bin) sets it at every step, and optimizer.bin holds the saved step's; "initial_lr" is
    the peak. `model`: unwrapped, so that the names are the model's own."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        settings = {key: list(value) if isinstance(value, tuple) else value for key, value in group.items()
                    if key not in ("params", "lr")
                    and (value is None or isinstance(value, (bool, int, float, str, tuple)))}
        groups.append({"parameters": [names[id(parameter)] for parameter in group["params"]], **settings})
    return {"optimizer": "torch.optim.AdamW", "groups": groups}


def make_optimizer(model: torch.nn.Module, config: TrainingConfig, fused: bool
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over parameter_groups, and the warmup-cosine schedule as a function of the optimizer step."""
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup_steps=config.warmup_steps, schedule_steps=config.schedule_steps,
        min_lr_ratio=config.min_lr_ratio))
    return optimizer, scheduler


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                             config: TrainingConfig) -> list[str]:
    """After a checkpoint is loaded: the config's peak learning rate, betas, eps and weight decay replace
    those of the run that saved it (loading restores them with the optimizer and schedule state), so a
    resume with a changed config trains with what it says. Returns the changes, one "name: old -> new" each.

    The groups are parameter_groups' [decay, no decay]; the schedule's shape comes from the config anyway.
    """
    learning_rate, betas = config.learning_rate, (config.adam_beta1, config.adam_beta2)
    changes: dict[str, str] = {}
    for group, decay_of_group in zip(optimizer.param_groups, group_weight_decays(config.weight_decay)):
        wanted = {"learning_rate": ("initial_lr", learning_rate), "adam_betas": ("betas", betas),
                  "adam_epsilon": ("eps", config.adam_epsilon), "weight_decay": ("weight_decay", decay_of_group)}
        for name, (key, value) in wanted.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                changes.setdefault(name, f"{name}: {old} -> {value}")
                group[key] = value
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # The rate of the next step, as LambdaLR would have set it had it run with these settings throughout.
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    return list(changes.values())


def grads_to_none(distributed_type: DistributedType, accumulation: int) -> bool:
    """Whether the step ends with zero_grad(set_to_none=True), freeing the gradients, rather than zeroing them in
    place. Under DDP with accumulation, in place: the gradients are views into its all-reduce buckets, and freed,
    the no_sync micro-batches would make a second set beside the buckets. With one micro-batch a step there is no
    no_sync backward, DDP makes the views again at the next backward, and freeing spares a pass over every
    gradient (the zeroing, and the adding of the first backward to zeros)."""
    ddp = distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    return not ddp or accumulation == 1
