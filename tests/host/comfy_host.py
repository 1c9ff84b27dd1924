"""Host-test helpers: the pack inside a real ComfyUI, found through COMFYUI_PATH.

They skip, with the reason, where no ComfyUI is given or it cannot be imported with the
running Python (run them with ComfyUI's own environment, e.g.
``COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/host``).
"""
import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from host_required import host_missing

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def _load_comfy():
    if not COMFYUI_PATH:
        return None, "COMFYUI_PATH is not set: host tests need a ComfyUI checkout (and its Python)"
    if not (Path(COMFYUI_PATH) / "comfy").is_dir():
        return None, f"COMFYUI_PATH={COMFYUI_PATH} has no comfy/ package: point it at a ComfyUI checkout"
    sys.path.insert(0, COMFYUI_PATH)
    try:
        # ComfyUI's top-level utils package, imported first as main.py does: ComfyUI's nodes.py puts comfy/ (with
        # its utils.py) first on sys.path, after which comfy_extras' nodes_images (its server import) finds that one
        import utils.install_util  # noqa: F401
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
        torch.set_num_threads(1)  # tiny models: threads only contend
        import comfy.model_management
        import comfy.model_patcher
        import comfy.patcher_extension
        import comfy.sample
        import comfy.samplers
        import comfy.supported_models
        import folder_paths
        import nodes
    except Exception as exc:  # a ComfyUI that does not import here is absent for these tests
        return None, f"ComfyUI at {COMFYUI_PATH} cannot be imported with {sys.executable}: {exc!r}"
    if "nodes" in sys.modules and not hasattr(sys.modules["nodes"], "common_ksampler"):
        return None, "the module 'nodes' is not ComfyUI's (the pack's nodes/ shadows it); put COMFYUI_PATH first on sys.path"
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes")):
        return None, "ComfyUI could not load the pack (see the log above)"
    pack = sys.modules[str(REPO).replace(".", "_x_")]
    return SimpleNamespace(
        comfy=comfy,
        nodes=nodes,
        folder_paths=folder_paths,
        pack=pack,
        new_nodes=sorted(set(nodes.NODE_CLASS_MAPPINGS) - before),
        engine=sys.modules[pack.__name__ + ".morse_engine"],
        hooks=sys.modules[pack.__name__ + ".nodes.sampling_hooks"],
    ), None


HOST, SKIP_REASON = _load_comfy()


@pytest.fixture(scope="session")
def host():
    if HOST is None:
        host_missing(SKIP_REASON)
    return HOST


CONTEXT_DIM = 32


def build_tiny_sd15(host, seed=0):
    """An SD1.x-family UNet from ComfyUI's own classes, with small widths."""
    unet_config = {
        "context_dim": CONTEXT_DIM, "model_channels": 32, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_checkpoint": False, "image_size": 32,
        "use_spatial_transformer": True, "legacy": False, "in_channels": 4, "out_channels": 4,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "use_temporal_resblock": False,
    }
    comfy = host.comfy
    model = comfy.supported_models.SD15(unet_config).get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.fixture
def tiny(host):
    return build_tiny_sd15(host)


def conditioning(seed, tokens=77, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=g), {}]]


@pytest.fixture
def dot_folder(host, tmp_path):
    """A dot_models folder registered with ComfyUI for this test."""
    folder = tmp_path / "dot_models"
    folder.mkdir()
    host.folder_paths.add_model_folder_path("dot_models", str(folder))
    yield folder
    paths, _ = host.folder_paths.folder_names_and_paths["dot_models"]
    paths.remove(str(folder))
    host.folder_paths.filename_list_cache.pop("dot_models", None)


def save_test_dot(host, model, folder, name="tiny.safetensors", m=1, seed=3):
    """A Dot for ``model`` with non-zero outputs (as if trained), saved as a real adapter file."""
    engine = host.engine
    unet = model.model.diffusion_model
    torch.manual_seed(seed)
    dot = engine.PaperDot.build(unet, engine.PaperDotConfig.for_backbone(unet, m=m, lora_rank=4, lora_alpha=4.0))
    with torch.no_grad():
        dot.out.weight.normal_(0, 0.02)
        for p in dot.lora.up.parameters():
            p.normal_(0, 0.02)
    engine.save_dot(folder / name, dot, base_family="tiny-sd15", fingerprint=engine.fingerprint_module(unet), measured_n=4.0)
    host.folder_paths.filename_list_cache.pop("dot_models", None)
    return name


def null_control(host):
    """A ControlNet stand-in whose residuals are empty: it reaches the model as a ``control`` input."""
    base = host.comfy.controlnet.ControlBase

    class NullControl(base):
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            return {"input": [], "middle": [], "output": []}

        def copy(self):
            c = NullControl()
            self.copy_to(c)
            return c

    return NullControl()
