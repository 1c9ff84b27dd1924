import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_root_init_imports_without_comfyui():
    """pytest or plain Python may import the pack's root __init__.py where ComfyUI is absent (a fresh
    interpreter: host tests in the same run put a real ComfyUI on this one's path)."""
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('morse_pack_root', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "sys.exit(1 if hasattr(module, 'comfy_entrypoint') else 0)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "__init__.py")], cwd=ROOT.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_never_imports_comfy_nodes_or_training():
    code = (
        "import sys, morse_engine; "
        "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','nodes','training','folder_paths','peft')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pyproject_and_requirements_never_name_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"] + sum(project["project"]["optional-dependencies"].values(), [])
    assert not [d for d in deps if d.lower().startswith(("torch", "torchvision"))]
    assert project["tool"]["comfy"]["PublisherId"]
    for name in ("requirements.txt", "requirements-train.txt", "requirements-dev.txt"):
        lines = [l.strip().lower() for l in (ROOT / name).read_text().splitlines() if l.strip() and not l.startswith("#")]
        assert not [l for l in lines if l.startswith(("torch", "torchvision"))], name
