"""The cost options on checkpoints ComfyUI loads: bf16 autocast, gradient checkpointing (with SDXL's
``y`` passed through the checkpointed backbone call) and accumulation, on the CPU."""
import json

import pytest
from safetensors import safe_open

from comfy_host import COMFYUI_PATH
from test_train_checkpoint import families, write_prompts  # noqa: F401  (families: a fixture)
from tiny_checkpoints import write_tiny_checkpoint


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_bf16_checkpointed_accumulated_training_on_a_checkpoint(host, families, dot_folder, tmp_path, capsys, family):  # noqa: F811
    from training import train_dot

    checkpoint = write_tiny_checkpoint(host, families, family, tmp_path / f"tiny_{family}.safetensors")
    argv = [
        "--checkpoint", str(checkpoint), "--prompts", str(write_prompts(tmp_path)), "--comfyui", COMFYUI_PATH,
        "--layout", "paper", "--name", family, "--runs", str(tmp_path / "runs"), "--out", str(dot_folder / f"{family}.safetensors"),
        "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--m", "1", "--lora-rank", "2", "--resolution", "64",
        "--trajectory-steps", "2,3", "--n-batch", "2", "--threads", "1", "--device", "cpu", "--precision", "bf16",
        "--grad-checkpointing",
    ]
    assert train_dot.main(argv) == 0
    out = capsys.readouterr().out
    assert "memory estimate: Dash weights" in out and "on cpu, bf16, gradient checkpointing" in out
    with safe_open(str(dot_folder / f"{family}.safetensors"), "pt") as f:
        training = json.loads(f.metadata()["training"])
    assert training["precision"] == "bf16" and training["grad_checkpointing"] and training["config"]["grad_accum"] == 2
    assert training["final_loss"] == training["final_loss"]  # not NaN
