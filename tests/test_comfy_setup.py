"""Host-free parts of training on a ComfyUI checkpoint: finding ComfyUI, the CLI's choices and errors.

Nothing here imports ComfyUI (the ComfyUI path is covered by tests/host/test_train_checkpoint.py).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import dash_source, train_dot
from training.host import comfy_setup, comfyui, data
from training.reference.unet import DEFAULT_DASH_PATH

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)


def fake_comfyui(root):
    (root / "comfy").mkdir(parents=True)
    return root


def test_comfyui_is_found_from_the_option_then_the_environment_then_custom_nodes(tmp_path, monkeypatch, no_env):
    option, env, host = fake_comfyui(tmp_path / "a"), fake_comfyui(tmp_path / "b"), fake_comfyui(tmp_path / "ComfyUI")
    pack = host / "custom_nodes" / "comfyui-morse"
    pack.mkdir(parents=True)
    monkeypatch.setattr(comfyui, "PACK_DIR", pack)
    assert comfyui.find_comfyui() == host.resolve()
    monkeypatch.setenv("COMFYUI_PATH", str(env))
    assert comfyui.find_comfyui() == env.resolve()
    assert comfyui.find_comfyui(str(option)) == option.resolve()


def test_no_comfyui_names_all_three_ways(tmp_path, monkeypatch, no_env):
    monkeypatch.setattr(comfyui, "PACK_DIR", tmp_path / "somewhere" / "pack")
    with pytest.raises(comfyui.ComfyUINotFound) as exc:
        comfyui.find_comfyui()
    assert "--comfyui" in str(exc.value) and "COMFYUI_PATH" in str(exc.value) and "custom_nodes" in str(exc.value)
    with pytest.raises(comfyui.ComfyUINotFound, match="has no comfy/ package"):
        comfyui.find_comfyui(str(tmp_path))


def test_a_comfyui_that_this_python_cannot_import_says_to_use_comfyuis_python(tmp_path):
    """In a fresh interpreter: in this one a real ComfyUI may already be imported (host tests in the same run),
    and a fake must neither be shadowed by it nor replace it."""
    root = fake_comfyui(tmp_path / "ComfyUI")
    (root / "comfy" / "__init__.py").write_text("")
    (root / "comfy" / "cli_args.py").write_text("import a_module_only_comfyuis_python_has\n")
    code = ("import sys; from pathlib import Path; from training.host import comfyui\n"
            "try:\n    comfyui.import_comfy(Path(sys.argv[1]))\nexcept comfyui.ComfyUINotFound as exc:\n"
            "    print(exc); sys.exit(0)\nsys.exit('imported')\n")
    result = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ComfyUI's own Python" in result.stdout


@pytest.mark.parametrize("layout", ["paper", "feature"])
def test_train_dot_refuses_checkpoint_options_with_a_clear_message(tmp_path, monkeypatch, capsys, no_env, layout):
    monkeypatch.setattr(comfyui, "PACK_DIR", tmp_path / "pack")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    assert train_dot.main(["--layout", layout, "--prompts", str(prompts), "--runs", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read before ComfyUI is found")
    assert train_dot.main(["--layout", layout, "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--comfyui" in err and "COMFYUI_PATH" in err and "custom_nodes" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "prompts.txt"]  # nothing written


def test_the_reference_weights_keep_the_reference_path():
    assert dash_source.is_reference_weights(DEFAULT_DASH_PATH)
    args = train_dot.parser().parse_args(["--checkpoint", str(DEFAULT_DASH_PATH)])
    assert not train_dot.wants_comfy(args)
    args = train_dot.parser().parse_args(["--checkpoint", "my_sd15.safetensors"])
    assert train_dot.wants_comfy(args)


def test_data_source_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        data.read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        data.read_prompts(empty)
    with pytest.raises(ValueError, match="holds no images"):
        data.find_images(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text(" a caption \n")
    (tmp_path / "b.jpg").write_bytes(b"")
    assert data.find_images(tmp_path) == [(tmp_path / "a.png", "a caption"), (tmp_path / "b.jpg", "")]


def test_trajectory_ranges_parse_one_value_or_min_max():
    args = train_dot.parser().parse_args(["--trajectory-steps", "12", "--trajectory-cfg", "3.5,7"])
    assert args.trajectory_steps == (12, 12) and args.trajectory_cfg == (3.5, 7.0)
    with pytest.raises(SystemExit):
        train_dot.parser().parse_args(["--trajectory-steps", "1,2,3"])
