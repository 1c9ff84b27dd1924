"""Tiny SD1.x / SD2.x-v / SDXL / Flux / Wan 2.1 checkpoints, written to disk with ComfyUI's own saver.

ComfyUI tells a checkpoint's family by the widths of its weights (``comfy/model_detection.py``),
so a UNet with small widths is not detected as SD1.x. These helpers register, for the length
of a test, subclasses of ComfyUI's own SD15 / SD20 / SDXL model configs whose detection keys
are the tiny widths and whose text encoders are ComfyUI's CLIP classes with a tiny config
(through the ``<name>_model_config`` override ComfyUI's SDClipModel reads; Flux's T5-XXL likewise). Everything else
(the UNet classes, model_sampling, extra_conds, the loader and the saver) is ComfyUI's own.
The VAE is ComfyUI's TAESD, which its VAE loader recognises inside a checkpoint.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}
TINY_SPIECE_VOCAB = 64  # UMT5's tokenizer ships inside a Wan checkpoint; the tiny one is trained by _tiny_spiece
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3, "projection_dim": 32}  # 3: SD2/SDXL read layer -2

UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_temporal_resblock": False, "use_temporal_attention": False, "model_channels": 32,
}


def _tiny_clip(base, names, t5=False, umt5=False):
    """A ComfyUI text-encoder class with every named CLIP shrunk to TINY_CLIP (and its T5-XXL or UMT5-XXL to TINY_T5)."""

    class Tiny(base):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            model_options = {**model_options, **{f"{n}_model_config": dict(TINY_CLIP) for n in names}}
            if t5:
                model_options["t5xxl_model_config"] = dict(TINY_T5)
            if umt5:
                model_options["umt5xxl_model_config"] = {**TINY_T5, "vocab_size": TINY_SPIECE_VOCAB}
            super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)

    Tiny.__name__ = f"Tiny{base.__name__}"
    return Tiny


def _tiny_spiece() -> torch.Tensor:
    """A small SentencePiece model (UMT5's tokenizer kind; ComfyUI ships none, a Wan checkpoint carries its own),
    as the ``spiece_model`` bytes ComfyUI's tokenizer reads."""
    import io

    import sentencepiece

    text = ["a red cube on a table", "a watercolour fox", "a city at night, rain", "a photo number one",
            "the quick brown fox jumps over the lazy dog"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model,
                                             vocab_size=TINY_SPIECE_VOCAB - 16, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             minloglevel=2, hard_vocab_limit=False)
    return torch.ByteTensor(list(model.getvalue()))


def tiny_families(host):
    """{family name: (model config class, full unet_config)} built from ComfyUI's own classes."""
    comfy = host.comfy
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip

    ClipTarget = comfy.supported_models_base.ClipTarget
    heads = {"num_heads": -1, "num_head_channels": 16}

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {"context_dim": 32, "model_channels": 32, "use_linear_in_transformer": False,
                       "adm_in_channels": None, "use_temporal_attention": False}

        def clip_target(self, state_dict={}):
            return ClipTarget(comfy.sd1_clip.SD1Tokenizer, _tiny_clip(comfy.sd1_clip.SD1ClipModel, ["clip_l"]))

    class TinySD20V(comfy.supported_models.SD20):
        unet_config = {"context_dim": 32, "model_channels": 32, "use_linear_in_transformer": True,
                       "adm_in_channels": None, "use_temporal_attention": False}
        unet_extra_config = {**heads, "attn_precision": torch.float32}

        def model_type(self, state_dict, prefix=""):
            # ComfyUI's SD2 check reads a norm of output block 11, which a 2-level UNet lacks; the saver marks
            # v-prediction models with a "v_pred" key (as SDXL's detection reads it)
            return comfy.model_base.ModelType.V_PREDICTION if "v_pred" in state_dict else comfy.model_base.ModelType.EPS

        def clip_target(self, state_dict={}):
            return ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer, _tiny_clip(comfy.text_encoders.sd2_clip.SD2ClipModel, ["clip_h"]))

    class TinySDXL(comfy.supported_models.SDXL):
        # context = clip_l (32) + clip_g (32); y = pooled clip_g (32) + 6 size embeddings of 256
        unet_config = {"model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [1, 1],
                       "context_dim": 64, "adm_in_channels": 32 + 6 * 256, "use_temporal_attention": False}
        unet_extra_config = dict(heads)

        def clip_target(self, state_dict={}):
            return ClipTarget(comfy.sdxl_clip.SDXLTokenizer, _tiny_clip(comfy.sdxl_clip.SDXLClipModel, ["clip_l", "clip_g"]))

    import comfy.text_encoders.flux

    class TinyFlux(comfy.supported_models.Flux):
        # ComfyUI's Flux detection reads the widths from the weights but fixes 24 heads and Flux's RoPE axes
        unet_config = {"image_model": "flux", "hidden_size": 64, "guidance_embed": True}
        unet_extra_config = {"num_heads": 2, "axes_dim": [8, 12, 12]}

        def clip_target(self, state_dict={}):
            return ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                              _tiny_clip(comfy.text_encoders.flux.FluxClipModel, ["clip_l"], t5=True))

    import comfy.text_encoders.wan

    class TinyWan21(comfy.supported_models.WAN21_T2V):
        # a full checkpoint (UMT5 text encoder inside, no VAE: data-free training needs none)
        unet_config = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64}
        unet_extra_config = {"num_heads": 2, "text_dim": TINY_T5["d_model"]}  # detection fixes dim // 128 heads, 4096

        def clip_target(self, state_dict={}):
            return ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer,
                              _tiny_clip(comfy.text_encoders.wan.WanT5Model, [], umt5=True))

    wan21 = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 64,
             "ffn_dim": 128, "freq_dim": 256, "text_dim": TINY_T5["d_model"], "out_dim": 16, "num_heads": 2,
             "num_layers": 5, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}

    flux = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
            "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3,
            "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
            "txt_ids_dims": []}
    return {
        "flux": (TinyFlux, flux),
        "wan21": (TinyWan21, wan21),
        "sd15": (TinySD15, {**UNET_COMMON, "context_dim": 32, "use_linear_in_transformer": False, "adm_in_channels": None}),
        "sd20v": (TinySD20V, {**UNET_COMMON, "context_dim": 32, "use_linear_in_transformer": True, "adm_in_channels": None}),
        "sdxl": (TinySDXL, {**UNET_COMMON, "context_dim": 64, "use_linear_in_transformer": True,
                            "adm_in_channels": 32 + 6 * 256, "num_classes": "sequential"}),
    }


@contextmanager
def tiny_families_registered(host):
    """ComfyUI's detection knows the tiny families (first in its list) inside the block, and not after."""
    import comfy.supported_models

    families = tiny_families(host)
    added = [cls for cls, _ in families.values()]
    comfy.supported_models.models[:0] = added
    try:
        yield families
    finally:
        for cls in added:
            comfy.supported_models.models.remove(cls)


def _randomise(module: torch.nn.Module, generator: torch.Generator, std=None):
    """ComfyUI's ops skip init (weights are torch.empty). ``std=None``: scaled by fan-in, with norms near 1,
    so activations keep their size through the layers and the prompt visibly changes the output (with a
    fixed small std the text's effect shrinks layer by layer to ~1e-5 and CFG would not be tested)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=generator)
            if std is not None:
                p.copy_(noise * std)
            elif p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def write_tiny_checkpoint(host, families, family: str, path: Path, seed: int = 0, v_prediction: bool = False,
                          in_channels: int = 4) -> Path:
    """A full checkpoint (UNet, CLIP, TAESD VAE) of ``family`` saved with comfy.sd.save_checkpoint.

    ``in_channels=9``: an inpainting model (latent, mask, masked image), as ComfyUI detects them."""
    comfy = host.comfy
    import comfy.model_base
    import comfy.sd
    import comfy.taesd.taesd

    cls, unet_config = families[family]
    dit = family in ("flux", "wan21")
    latent_channels = {"flux": 16, "wan21": 16}.get(family, 4)
    config = cls(unet_config if dit else {**unet_config, "in_channels": in_channels})
    model = config.get_model({"v_pred": torch.tensor([])} if v_prediction else {}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    _randomise(model.diffusion_model, g)
    mm = comfy.model_management
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    tokenizer_data = {"spiece_model": _tiny_spiece()} if family == "wan21" else {}
    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=None, tokenizer_data=tokenizer_data)
    _randomise(clip.cond_stage_model, g)
    if family == "wan21":  # Wan's VAE is a video VAE, TAESD is not; prompts-only training needs no VAE
        comfy.sd.save_checkpoint(str(path), patcher, clip, None)
        return path
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _randomise(taesd, g, std=0.05)
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    comfy.sd.save_checkpoint(str(path), patcher, clip, vae)  # marks V_PREDICTION models with a "v_pred" key
    return path


# What ComfyUI's text-encoder detection reads to call a file UMT5-XXL / T5-XXL (comfy.sd.detect_te_model): the 24th
# block's feed-forward, 4096 wide. The tiny UMT5 carries this one entry with its real width (1 x 4096, ignored on
# loading: the tiny model has no 24th block) so that CLIPLoader's own detection picks Wan's text encoder for it.
UMT5_DETECTION_KEY = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"


@contextmanager
def tiny_umt5_loadable():
    """Inside the block, CLIPLoader(type "wan") builds Wan's UMT5 with TINY_T5's sizes: the one part of loading a
    Wan text encoder a tiny file cannot steer (the XXL config ships with ComfyUI). Detection, tokenizer (the file's
    own SentencePiece model), loading and encoding stay ComfyUI's."""
    import comfy.text_encoders.wan as wan

    real = wan.te

    def tiny_te(*args, **kwargs):
        return _tiny_clip(real(*args, **kwargs), [], umt5=True)

    wan.te = tiny_te
    try:
        yield
    finally:
        wan.te = real


def write_tiny_wan_files(host, families, unet_path: Path, text_encoder_path: Path, vae_path: Path, seed: int = 0):
    """Wan 2.1 t2v as users have it, three files: the diffusion model (UNETLoader), UMT5 with its tokenizer
    (CLIPLoader, type wan) and the VAE (VAELoader), each tiny; ComfyUI's savers' formats."""
    comfy = host.comfy
    import comfy.ldm.wan.vae
    import comfy.utils

    cls, unet_config = families["wan21"]
    config = cls(dict(unet_config))
    model = config.get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    _randomise(model.diffusion_model, g)
    comfy.utils.save_torch_file(model.diffusion_model.state_dict(), str(unet_path))

    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=None, tokenizer_data={"spiece_model": _tiny_spiece()})
    _randomise(clip.cond_stage_model, g)
    prefix = "umt5xxl.transformer."
    te = {k[len(prefix):]: v for k, v in clip.cond_stage_model.state_dict().items() if k.startswith(prefix)}
    te["spiece_model"] = clip.tokenizer.state_dict()["spiece_model"]
    te[UMT5_DETECTION_KEY] = torch.zeros(1, 4096)
    comfy.utils.save_torch_file(te, str(text_encoder_path))

    vae = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], image_channels=3, dropout=0.0)
    _randomise(vae, g, std=0.05)
    comfy.utils.save_torch_file(vae.state_dict(), str(vae_path))
