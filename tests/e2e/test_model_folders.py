"""Every checkpoint folder is a Hugging Face model folder as it is (from_pretrained, AutoTokenizer and pipeline load
it, with the export's logits), and its whole training state loads with stock Accelerate and transformers by the
README's lines, run here as they are with nothing of this project imported."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from conftest import REPO_ROOT, run_train, write_config
from utils.checkpoints.export import export_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    folder = tmp_path_factory.mktemp("run")
    result = run_train("--config", str(write_config(folder, sample_data, max_steps=4, save_steps=4)))
    assert result.returncode == 0, result.stderr[-3000:]
    [saved] = (folder / "checkpoints").glob("checkpoint-*")
    return saved


def test_a_checkpoint_loads_as_a_hugging_face_model_with_the_exports_logits(checkpoint: Path, tmp_path: Path) -> None:
    exported = export_checkpoint(checkpoint, tmp_path / "export", dtype="fp32")
    ids = torch.tensor([[5, 17, 230, 9, 64, 3]])
    with torch.no_grad():
        from_checkpoint = AutoModelForCausalLM.from_pretrained(checkpoint).eval()(input_ids=ids).logits
        from_export = AutoModelForCausalLM.from_pretrained(exported.out_dir).eval()(input_ids=ids).logits
    assert torch.equal(from_checkpoint, from_export)
    text = "Return the number of items"
    assert AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(exported.out_dir)(text)["input_ids"]
    generated = pipeline("text-generation", model=str(checkpoint))(text, max_new_tokens=4, do_sample=False)
    assert generated[0]["generated_text"].startswith(text)
    # The few small files that make it so, and nothing big.
    added = ("config.json", "generation_config.json", "tokenizer_config.json", "optimizer_groups.json")
    assert sum((checkpoint / name).stat().st_size for name in added) < 20_000
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "gpt_neox"
    assert "causal_sdpa" not in (checkpoint / "config.json").read_text()  # the project's own attention name


def test_the_readmes_stock_accelerate_lines_load_the_whole_training_state(checkpoint: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- stock-accelerate-snippet -->\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    snippet = re.sub(r'^checkpoint = ".*"$', f'checkpoint = "{checkpoint}"', snippet, flags=re.MULTILINE)
    checks = '''
from safetensors.torch import load_file
saved = torch.load(f"{checkpoint}/optimizer.bin", weights_only=True)
loaded = optimizer.state_dict()
assert len(loaded["state"]) == len(saved["state"]) > 0
for index, state in saved["state"].items():
    assert all(torch.equal(loaded["state"][index][key], value) for key, value in state.items())
weights = load_file(f"{checkpoint}/model.safetensors")
assert all(torch.equal(parameter, weights[name]) for name, parameter in model.named_parameters())
import sys
assert not [name for name in sys.modules if name.split(".")[0] in ("utils", "configs", "train", "scripts")]
print("loaded", len(saved["state"]), "parameter states")
'''
    result = subprocess.run([sys.executable, "-c", snippet + checks], cwd=checkpoint.parent, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^loaded \d+ parameter states$", result.stdout, re.MULTILINE)
