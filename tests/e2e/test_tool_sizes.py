"""One size for one checkpoint in every tool: the monitor and upload_manager print the same decimal megabytes (the
monitor once printed MiB labelled MB: 21.4 against 22.4 for the same folder)."""
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

NAME = "checkpoint-epoch0-step4-files0"


def tool(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_monitor_and_upload_manager_print_one_size(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / NAME
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(bytes(22_400_000))  # 21.4 MiB
    (checkpoint / "metadata.json").write_text('{"step": 4}')
    size = sum(path.stat().st_size for path in checkpoint.iterdir())
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text(json.dumps(
        {"event": "save", "step": 4, "checkpoint": NAME, "bytes": size, "seconds_blocked": 0.1,
         "seconds_writing": 0.2, "async": False}) + "\n")
    listed = tool("scripts/upload_manager.py", "list", "--checkpoint-dir", str(tmp_path / "checkpoints"))
    monitored = tool("scripts/monitor_training.py", "--once", "--checkpoint-dir", str(tmp_path / "checkpoints"),
                     "--log-dir", str(tmp_path / "logs"))
    assert re.search(rf"{NAME} +Step: 4 +22\.4 MB", listed), listed
    assert f"Last save: {NAME} at step 4, 22.4 MB" in monitored, monitored
