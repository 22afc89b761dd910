"""Model presets, training configs, the learning-rate schedule and the optimizer groups."""
import json
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from configs.model_config import build_model_config, padded_vocab_size, resolve_shape
from configs.training_config import ConfigError, config_from_dict, load_config
from utils.training_utils import lr_multiplier, parameter_groups


def test_1_2b_preset_has_pythia_1_4b_parameter_counts() -> None:
    config = build_model_config(resolve_shape("1.2b"))
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert config.vocab_size == 50304
    assert total == 1_414_647_808
    assert total - embeddings == 1_208_602_624
    assert config.num_hidden_layers == 24 and config.hidden_size == 2048 and config.num_attention_heads == 16
    assert config.intermediate_size == 8192 and config.max_position_embeddings == 2048
    assert config.use_parallel_residual and not config.tie_word_embeddings
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config._attn_implementation == "sdpa"


def test_vocab_is_padded_to_a_multiple_of_128() -> None:
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(4096) == 4096
    assert padded_vocab_size(4097) == 4224


@pytest.mark.parametrize("name, steps, batch, save, log", [
    ("test", 100, 1, 50, 10), ("production", 10000, 4, 500, 100), ("tiny", 200, 8, 100, 10)])
def test_shipped_configs_load_with_the_original_key_names(name: str, steps: int, batch: int, save: int,
                                                          log: int) -> None:
    raw = json.loads((Path("configs") / f"{name}.json").read_text())
    for key in ("max_files", "max_steps", "per_device_train_batch_size", "save_steps", "logging_steps"):
        assert key in raw
    config = load_config(name)
    assert (config.max_steps, config.per_device_train_batch_size, config.save_steps,
            config.logging_steps) == (steps, batch, save, log)


def test_tiny_config_uses_the_tiny_model_and_test_uses_five_files() -> None:
    assert load_config("tiny").model_preset == "tiny"
    assert load_config("test").max_files == 5
    assert load_config("production").max_files == -1


def test_overrides_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"model_preset": "tiny", "model": {"seq_len": 128}, "max_steps": 7, "warmup_steps": 2}))
    config = load_config(str(path), {"max_steps": 9, "data": None})
    assert config.max_steps == 9 and config.model_shape().seq_len == 128 and config.data == "data/sample"


@pytest.mark.parametrize("values, message", [
    ({"max_stepz": 5}, "unknown key(s) max_stepz"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
    ({"max_steps": "10"}, "max_steps has the wrong type"),
    ({"learning_rate": -1.0}, "learning_rate must be in (0, 1]"),
    ({"learning_rate": 1e300}, "learning_rate must be in (0, 1]"),  # once a traceback at the first step
    ({"adam_epsilon": 1e300}, "adam_epsilon must be in (0, 1)"),
    ({"adam_epsilon": 0}, "adam_epsilon must be in (0, 1)"),  # NaN at the first step
    ({"weight_decay": 1e300}, "weight_decay 1e+300 times learning_rate 0.0002 must be below 1"),
    ({"process_group_timeout_s": 1e300}, "process_group_timeout_s must be in (0, 604800]"),  # once an OverflowError
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"max_files": 0}, "max_files must be -1"),
    ({"warmup_steps": 500, "lr_decay_steps": 100}, "warmup_steps 500 exceeds lr_decay_steps 100"),
    ({"model_preset": "7b"}, "unknown model preset '7b'"),
    ({"model": {"layers": 3}}, "unknown model field(s) layers"),
    ({"model": {"hidden_size": 100, "num_attention_heads": 3}}, "not divisible"),
    ({"init": "xavier"}, "init must be one of pythia, hf"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number, got nan"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number, got nan"),
    ({"upload_timeout_s": float("inf")}, "upload_timeout_s must be a finite number, got inf"),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(tmp_path: Path, values: dict, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(path) in str(error.value)


def test_unknown_config_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known configs: .*production.*test.*tiny"):
        load_config("nonexistent")


def test_lr_schedule_warms_up_then_decays_to_ten_percent() -> None:
    def lr(step: int) -> float:
        return lr_multiplier(step, warmup_steps=10, schedule_steps=110, min_lr_ratio=0.1)

    warmup = [lr(s) for s in range(10)]
    assert warmup == sorted(warmup) and warmup[0] < 0.2 and warmup[-1] < 1.0
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway through the cosine: midway between 1 and 0.1
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    decay = [lr(s) for s in range(10, 111)]
    assert decay == sorted(decay, reverse=True)


def test_weight_decay_only_on_weight_matrices() -> None:
    model = GPTNeoXForCausalLM(build_model_config(resolve_shape("tiny", {"num_hidden_layers": 1})))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "gpt_neox.embed_in.weight" in spared and "lm_head.weight" in decayed
    assert all(n.endswith("bias") or "norm" in n or "embed_in" in n for n in spared)
    assert any("query_key_value.weight" in n for n in decayed)
    assert len(decayed) + len(spared) == len(list(model.parameters()))


def test_command_line_paths_are_relative_to_the_current_folder_config_paths_to_the_repo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from configs.command_line import config_from_args, parse_args
    from conftest import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    config = config_from_args(parse_args(["--config", "tiny", "--checkpoint-dir", "runs/a", "--data", "shards",
                                          "--log-dir", "/abs/logs"]))
    assert config.checkpoint_dir == str(tmp_path / "runs" / "a")
    assert config.data == str(tmp_path / "shards")
    assert config.log_dir == "/abs/logs"
    assert config.cache_dir.startswith(str(REPO_ROOT))  # from configs/tiny.json (or the default): the repo's
    assert config_from_args(parse_args(["--config", "tiny", "--data", "gs://bucket/x"])).data == "gs://bucket/x"
    assert load_config("tiny").upload_destination is not None  # so that the overrides below are tested
    assert config_from_args(parse_args(["--config", "tiny", "--upload-destination", "none"])).upload_destination is None
    moved = config_from_args(parse_args(["--config", "tiny", "--upload-destination", "up"]))
    assert moved.upload_destination == str(tmp_path / "up")


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "error: unrecognized arguments: --bogus (see train.py --help)"),
    (["--max-steps", "ten"], "error: argument --max-steps: invalid int value: 'ten' (see train.py --help)")])
def test_a_bad_flag_is_one_error_line_with_exit_code_2(argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from configs.command_line import parse_args
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", "tiny", *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == message + "\n"  # argparse's usage lines are left to --help
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, key", [(["--max-steps", "5", "--set", "max_steps=7"], "max_steps"),
                                       (["--upload-destination", "none", "--set", "upload_destination=up"],
                                        "upload_destination"),
                                       (["--skip-preflight", "--set", "memory_preflight=true"], "memory_preflight")])
def test_a_field_given_by_its_flag_and_by_set_is_refused(argv: list[str], key: str) -> None:
    from configs.command_line import config_from_args, parse_args
    with pytest.raises(ConfigError, match=f"^{key} is given twice, by its flag and by --set {key}=...; give it once$"):
        config_from_args(parse_args(["--config", "tiny", *argv]))


def test_a_run_shorter_than_its_warmup_is_allowed_and_a_flag_error_names_the_flag() -> None:
    assert load_config("tiny", {"max_steps": 10}).max_steps == 10  # tiny warms up for 20 steps: a smoke test
    with pytest.raises(ConfigError, match=r"configs/tiny.json with max_steps=0 from the command line: max_steps"):
        load_config("tiny", {"max_steps": 0, "data": None})


def test_the_global_batch_is_shared_by_any_number_of_processes() -> None:
    config = config_from_dict({"model_preset": "tiny", "global_batch_size": 256, "per_device_train_batch_size": 4},
                              "test")
    assert [(n, config.accumulation(n), config.global_batch(n)) for n in (1, 2, 8)] == [
        (1, 64, 256), (2, 32, 256), (8, 8, 256)]
    with pytest.raises(ConfigError, match=r"^global_batch_size 256 is not a multiple of per_device_train_batch_size 4 "
                                          r"x 3 process\(es\) = 12: use global_batch_size 252 or 264$"):
        config.accumulation(3)
    odd = config_from_dict({"model_preset": "tiny", "global_batch_size": 6, "per_device_train_batch_size": 4}, "test")
    with pytest.raises(ConfigError, match="use global_batch_size 4 or 8, or per_device_train_batch_size 3$"):
        odd.accumulation(1)
    legacy = config_from_dict({"model_preset": "tiny", "per_device_train_batch_size": 2,
                               "gradient_accumulation_steps": 3}, "test")
    assert legacy.global_batch(2) == 12  # without global_batch_size the batch grows with the processes
    with pytest.raises(ConfigError, match="set global_batch_size .* or gradient_accumulation_steps .*, not both"):
        config_from_dict({"model_preset": "tiny", "global_batch_size": 8, "gradient_accumulation_steps": 2}, "test")


def test_the_shipped_configs_keep_their_batch_on_any_gpu_count() -> None:
    production = load_config("production")
    assert production.global_batch_size == 256 and production.per_device_train_batch_size == 4
    assert production.global_batch(1) * production.model_shape().seq_len == 524_288  # tokens a step, 1 GPU or 8
    assert production.accumulation(8) == 8 and production.accumulation(1) == 64
    assert load_config("tiny").accumulation(1) == 1 and load_config("test").global_batch_size == 8
