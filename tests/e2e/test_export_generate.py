"""Export to a Hugging Face folder (local, archived and gs:// checkpoints) and text generation."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gcs_emulator import gcs_server  # noqa: F401  (the fixture)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM

from configs.model_config import ModelShape, build_model_config
from conftest import REPO_ROOT, run_train, write_config
from scripts import export_hf, generate
from utils.checkpoints.checksums import record_checksums
from utils.checkpoints.export import materialize_checkpoint
from utils.uploads.destination import open_destination
from utils.uploads.formats import write_archive
from utils.uploads.uploader import Uploader, UploadSettings

PROMPT = "Return the number of"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    """A run of 4 steps whose end exports itself (export_hf_dir, fp32); returns its folder."""
    folder = tmp_path_factory.mktemp("run")
    config = write_config(folder, sample_data, max_steps=4, save_steps=4, export_hf_dir=str(folder / "auto_export"),
                          export_dtype="fp32")
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "as a Hugging Face model to" in result.stderr
    return folder


def checkpoint_of(run: Path) -> Path:
    return run / "checkpoints" / "checkpoint-epoch0-step4-files0"


def training_model(checkpoint: Path) -> GPTNeoXForCausalLM:
    """The model exactly as train.py builds it, with the checkpoint's weights."""
    shape = ModelShape(**json.loads((checkpoint / "training_config.json").read_text())["model_shape"])
    model = GPTNeoXForCausalLM(build_model_config(shape))
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return model.eval()


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def sample_ids(sample_data: Path) -> torch.Tensor:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(sample_data / "tokenizer.json")).encode("Return a list of the items in order.").ids
    return torch.tensor([ids])


# --- export ------------------------------------------------------------------------------------

def test_checkpoint_holds_the_run_tokenizer(trained: Path, sample_data: Path) -> None:
    assert (checkpoint_of(trained) / "tokenizer.json").read_bytes() == (sample_data / "tokenizer.json").read_bytes()


def test_fp32_export_reloads_with_equal_logits(trained: Path, sample_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert export_hf.main([str(checkpoint_of(trained)), str(out), "--dtype", "fp32"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".export-hf-*"))  # nothing left behind
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is GPTNeoXForCausalLM and exported.dtype == torch.float32
    input_ids = sample_ids(sample_data)
    torch.testing.assert_close(logits(exported, input_ids), logits(training_model(checkpoint_of(trained)), input_ids),
                               rtol=0, atol=0)
    # The automatic export at the end of training is the same model.
    auto = AutoModelForCausalLM.from_pretrained(trained / "auto_export").eval()
    torch.testing.assert_close(logits(auto, input_ids), logits(exported, input_ids), rtol=0, atol=0)


def test_the_exported_weights_follow_the_umask_like_every_other_file(trained: Path, tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        assert export_hf.main([str(checkpoint_of(trained)), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and modes == dict.fromkeys(modes, 0o640)  # safetensors alone wrote 0600


def test_bf16_export_and_tokenizer(trained: Path, sample_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert export_hf.main([str(checkpoint_of(trained)), str(out)]) == 0  # bf16 by default
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.dtype == torch.bfloat16
    weights = load_file(checkpoint_of(trained) / "model.safetensors")
    assert torch.equal(exported.gpt_neox.embed_in.weight, weights["gpt_neox.embed_in.weight"].bfloat16())
    input_ids = sample_ids(sample_data)
    reference = logits(training_model(checkpoint_of(trained)), input_ids)
    assert (logits(exported, input_ids) - reference).abs().max() < 0.1
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Return a list of the items in order.").input_ids == input_ids[0].tolist()
    assert tokenizer.eos_token_id == exported.config.eos_token_id


def test_export_refuses_to_overwrite_and_bad_checkpoints(trained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hf"
    assert export_hf.main([str(checkpoint_of(trained)), str(out)]) == 0
    assert export_hf.main([str(checkpoint_of(trained)), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export_hf.main([str(checkpoint_of(trained)), str(out), "--overwrite"]) == 0
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    assert export_hf.main([str(checkpoint_of(trained)), str(tmp_path / "precious"), "--overwrite"]) == 2
    assert "not an exported model folder" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"
    # A checkpoint holds a config.json too (a model folder as it is), but is never taken for an earlier export.
    other = tmp_path / "other-checkpoint"
    shutil.copytree(checkpoint_of(trained), other)
    assert export_hf.main([str(checkpoint_of(trained)), str(other), "--overwrite"]) == 2
    assert "is not an exported model folder (no config.json, or a training checkpoint)" in capsys.readouterr().err
    assert (other / "optimizer.bin").is_file()

    assert export_hf.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert export_hf.main([str(trained / "checkpoints"), str(tmp_path / "x")]) == 2
    assert "not a training checkpoint (no training_config.json)" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint_of(trained), broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert export_hf.main([str(broken), str(tmp_path / "x")]) == 2
    assert "model.safetensors: damaged (15 bytes" in capsys.readouterr().err  # checksums.json says what it was
    (broken / "checksums.json").unlink()  # as a checkpoint of an earlier version, which records none
    assert export_hf.main([str(broken), str(tmp_path / "x")]) == 2
    assert "records no checksums.json" in capsys.readouterr().err
    assert export_hf.main([str(broken), str(tmp_path / "x"), "--allow-unverified"]) == 2
    assert "model.safetensors: unreadable" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, on purpose
def test_export_of_a_sharded_fsdp_checkpoint(trained: Path, sample_data: Path, tmp_path: Path) -> None:
    """Under FSDP Accelerate saves the model as a torch.distributed.checkpoint folder {"model": state}."""
    import torch.distributed.checkpoint as dcp
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint_of(trained), sharded)
    (sharded / "model.safetensors").unlink()
    state = load_file(checkpoint_of(trained) / "model.safetensors")
    dcp.save({"model": {f"_orig_mod.{name}": tensor for name, tensor in state.items()}},
             checkpoint_id=str(sharded / "pytorch_model_fsdp_0"))
    assert export_hf.main([str(sharded), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    input_ids = sample_ids(sample_data)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(exported, input_ids), logits(training_model(checkpoint_of(trained)), input_ids),
                               rtol=0, atol=0)


def checkpoint_without_tokenizer(trained: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint with no tokenizer.json whose run's data folder holds none either."""
    bare = tmp_path / checkpoint_of(trained).name
    shutil.copytree(checkpoint_of(trained), bare)
    (bare / "tokenizer.json").unlink()
    config = json.loads((bare / "training_config.json").read_text())
    config["data"] = str(tmp_path / "gone")
    (bare / "training_config.json").write_text(json.dumps(config))
    record_checksums(bare)  # as such a run would have saved it
    return bare


def test_checkpoint_without_tokenizer(trained: Path, sample_data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    bare = checkpoint_without_tokenizer(trained, tmp_path)
    assert export_hf.main([str(bare), str(tmp_path / "model_only")]) == 0
    assert "no tokenizer found" in capsys.readouterr().out
    assert not (tmp_path / "model_only" / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model_only") is not None

    assert generate.main([str(bare), "--prompt", PROMPT]) == 2
    error = capsys.readouterr().err
    assert "no tokenizer" in error and "pass --tokenizer" in error
    assert generate.main([str(tmp_path / "model_only"), "--prompt", PROMPT]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    # --tokenizer supplies one.
    assert generate.main([str(bare), "--prompt", PROMPT, "--max-new-tokens", "3",
                          "--tokenizer", str(sample_data / "tokenizer.json")]) == 0
    assert capsys.readouterr().out.startswith(PROMPT)


def test_export_from_local_archive_and_gcs(trained: Path, sample_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture, gcs_server) -> None:  # noqa: F811
    checkpoint = checkpoint_of(trained)
    archive = tmp_path / f"{checkpoint.name}.tar.zst"
    with open(archive, "wb") as handle:
        write_archive(checkpoint, handle, "tar.zst")
    input_ids = sample_ids(sample_data)
    reference = logits(training_model(checkpoint), input_ids)

    assert export_hf.main([str(archive), str(tmp_path / "from_archive"), "--dtype", "fp32"]) == 0
    # The tokenizer is named where it ends up, not in the unpacked checkpoint deleted afterwards.
    out = capsys.readouterr().out
    assert f"Tokenizer: {tmp_path / 'from_archive' / 'tokenizer.json'}\n" in out and ".export-hf-" not in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from_archive")
    torch.testing.assert_close(logits(model.eval(), input_ids), reference, rtol=0, atol=0)

    gcs_server.create_bucket("bucket")
    gcs_server.put("bucket", f"Checkpoints/{archive.name}", archive.read_bytes())
    # By checkpoint name (the archive is found) and by the archive's own name.
    for reference_url in (f"gs://bucket/Checkpoints/{checkpoint.name}", f"gs://bucket/Checkpoints/{archive.name}"):
        out = tmp_path / reference_url.rsplit("/", 1)[1].replace(".", "_")
        assert export_hf.main([reference_url, str(out), "--dtype", "fp32"]) == 0
        model = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(logits(model.eval(), input_ids), reference, rtol=0, atol=0)
        assert (out / "tokenizer.json").is_file()  # carried inside the checkpoint
    assert export_hf.main(["gs://bucket/Checkpoints/checkpoint-epoch0-step9-files0", str(tmp_path / "none")]) == 2


def test_export_and_generate_from_the_files_layout(trained: Path, sample_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, gcs_server) -> None:  # noqa: F811
    checkpoint = checkpoint_of(trained)
    gcs_server.create_bucket("bucket")
    for url in ("gs://bucket/Checkpoints", str(tmp_path / "uploads")):
        Uploader(open_destination(url), checkpoint.parent, UploadSettings("files", background=False)).submit(checkpoint)
    input_ids = sample_ids(sample_data)
    reference = logits(training_model(checkpoint), input_ids)
    local_manifest = tmp_path / "uploads" / f"{checkpoint.name}.files.json"
    for source in (f"gs://bucket/Checkpoints/{checkpoint.name}", f"gs://bucket/Checkpoints/{local_manifest.name}",
                   str(local_manifest)):
        out = tmp_path / f"hf-{len(list(tmp_path.glob('hf-*')))}"
        assert export_hf.main([source, str(out), "--dtype", "fp32"]) == 0, source
        model = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(logits(model.eval(), input_ids), reference, rtol=0, atol=0)
        assert (out / "tokenizer.json").is_file()
    greedy = ["--prompt", PROMPT, "--max-new-tokens", "5", "--temperature", "0"]
    capsys.readouterr()
    assert generated([f"gs://bucket/Checkpoints/{checkpoint.name}", *greedy], capsys) == \
        generated([str(checkpoint), *greedy], capsys)
    # Export and generation read the weights and the JSON files only: the optimizer and RNG states stay behind.
    materialized = materialize_checkpoint(f"gs://bucket/Checkpoints/{checkpoint.name}", tmp_path / "work")
    names = {path.name for path in materialized.iterdir()}
    assert {"model.safetensors", "training_config.json", "tokenizer.json", "metadata.json"} <= names
    assert "optimizer.bin" in {path.name for path in checkpoint.iterdir()}
    assert not {name for name in names if name.startswith(("optimizer", "random_states", "scheduler"))
                and not name.endswith(".json")}  # optimizer_groups.json is a few KB of names
    archive = tmp_path / f"{checkpoint.name}.tar"
    with open(archive, "wb") as handle:
        write_archive(checkpoint, handle, "tar")
    from_archive = materialize_checkpoint(str(archive), tmp_path / "work2")
    assert not (from_archive / "optimizer.bin").exists() and (from_archive / "model.safetensors").is_file()


# --- generation --------------------------------------------------------------------------------

def generated(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert generate.main(args) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_generate_from_checkpoint_and_export(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = str(checkpoint_of(trained))
    text = generated([checkpoint, "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "3"], capsys)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    # Seeded: the same command gives the same text.
    assert generated([checkpoint, "--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "3"], capsys) == text
    # Greedy decoding from the checkpoint and from its fp32 export agree token for token.
    greedy = ["--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "0"]
    from_checkpoint = generated([checkpoint, *greedy], capsys)
    from_export = generated([str(trained / "auto_export"), *greedy], capsys)
    assert from_checkpoint == from_export and len(from_checkpoint) > len(PROMPT)

    # The prompt plus the new tokens must fit the model's context (64 tokens for the micro model).
    assert generate.main([checkpoint, "--prompt", PROMPT, "--max-new-tokens", "100"]) == 2
    assert "exceeds the model's context of 64" in capsys.readouterr().err


def test_export_names_the_exported_tokenizer_and_its_source(trained: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert export_hf.main([str(checkpoint_of(trained)), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"Tokenizer: {tmp_path / 'hf' / 'tokenizer.json'} (from {checkpoint_of(trained) / 'tokenizer.json'})" in out


def test_generate_from_an_archive(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = checkpoint_of(trained)
    archive = tmp_path / f"{checkpoint.name}.tar.zst"
    with open(archive, "wb") as handle:
        write_archive(checkpoint, handle, "tar.zst")
    greedy = ["--prompt", PROMPT, "--max-new-tokens", "5", "--temperature", "0"]
    assert generated([str(archive), *greedy], capsys) == generated([str(checkpoint), *greedy], capsys)


def test_generate_help_mentions_archives(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    assert ".tar.zst" in capsys.readouterr().out


def test_generate_bad_device_and_tokenizer_are_one_line(trained: Path, tmp_path: Path, monkeypatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    checkpoint = str(checkpoint_of(trained))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    assert generate.main([checkpoint, "--prompt", PROMPT, "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --device cuda: ") and "use --device cpu" in error
    assert len(error.strip().splitlines()) == 1
    assert generate.main([checkpoint, "--prompt", PROMPT, "--device", "gpu0"]) == 2
    assert capsys.readouterr().err.startswith("error: --device gpu0: not a device")
    missing = tmp_path / "nope.json"
    assert generate.main([checkpoint, "--prompt", PROMPT, "--tokenizer", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: --tokenizer {missing}: no such file\n"
    assert generate.main([checkpoint, "--prompt", PROMPT, "--tokenizer", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --tokenizer {tmp_path}: a folder without tokenizer.json\n"


def test_generate_cli_bad_path_is_one_line() -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "generate.py"), "/nonexistent/ckpt",
                             "--prompt", "x"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: /nonexistent/ckpt: no such checkpoint or model folder"


def test_train_refuses_an_export_folder_it_may_not_replace_before_training(tmp_path: Path, sample_data: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    result = run_train("--config", str(write_config(tmp_path, sample_data, export_hf_dir=str(precious))))
    assert result.returncode == 2
    assert "is not an exported model folder (no config.json, or a training checkpoint); refusing to replace it" \
        in result.stderr
    # train.py creates (and probes) checkpoint_dir at start; nothing is saved in it.
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*")) and (precious / "notes.txt").read_text() == "keep"


def test_a_damaged_checkpoint_is_not_exported_or_generated_from(tmp_path: Path, trained: Path, capsys) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint_of(trained), damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit flipped in the weights: still a valid safetensors file
    weights.write_bytes(bytes(data))
    assert export_hf.main([str(damaged), str(tmp_path / "out")]) == 2
    assert generate.main([str(damaged), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"error: {weights}: damaged (crc32c {errors[0].split('crc32c ')[1]}"] * 2
    assert not (tmp_path / "out").exists()
