"""The default Dot (widths and LoRA from morse_engine.default_widths / PaperDotConfig) stays at or below
10% of Dash's parameters on ComfyUI's own SD1.5 and SDXL UNets, built on the meta device (no memory)."""
import pytest
import torch


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_default_dot_is_at_most_a_tenth_of_dash(host, arch):
    from training.bench_backbones import comfy_unet_config

    kind = {"sd15": host.comfy.supported_models.SD15, "sdxl": host.comfy.supported_models.SDXL}[arch]
    with torch.device("meta"):
        unet = kind(comfy_unet_config(arch)).get_model({}, device=torch.device("meta")).diffusion_model
    dash = sum(p.numel() for p in unet.parameters())
    assert dash > (2.5e9 if arch == "sdxl" else 8.5e8)  # the real architectures, not a miniature
    engine = host.engine
    for m in (1, 2, 3):
        dot = engine.PaperDot.build(unet, engine.PaperDotConfig.for_backbone(unet, m=m))
        share = sum(p.numel() for p in dot.parameters()) / dash
        assert share <= 0.10, (arch, m, share)
