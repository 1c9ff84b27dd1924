"""Tiny instances of ComfyUI 0.8.0's own DiT / flow model classes, for the family matrix.

Each entry is ComfyUI's ``supported_models`` config class with a small ``unet_config`` (few blocks, hidden 64)
and what its conditioning needs (``pooled_output``, ``attention_mask``, ...), so the model is built, its
``model_sampling`` chosen and its ``extra_conds`` made by ComfyUI itself; the weights are random (ComfyUI's ops
skip initialisation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT = 32  # text-embedding width of every tiny family
TOKENS = 8


@dataclass(frozen=True)
class TinyFamily:
    name: str
    config_class: str  # comfy.supported_models.<this>
    unet_config: dict
    latent: tuple  # (channels, [frames,] height, width) of one latent
    extra_cond: dict = field(default_factory=dict)  # name -> shape of a tensor (batch first) or a constant
    blocks: tuple = ()  # the block-replace keys the class offers ("double_block", "single_block"), () for none


FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": TEXT, "context_in_dim": TEXT,
        "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3,
        "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
        "txt_ids_dims": []}
WAN21 = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 64,
         "ffn_dim": 128, "freq_dim": 256, "text_dim": TEXT, "out_dim": 16, "num_heads": 2, "num_layers": 5,
         "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
LUMINA2 = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": TEXT,
           "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True,
           "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
           "ffn_dim_multiplier": 4.0, "multiple_of": 16}

FAMILIES = {f.name: f for f in [
    TinyFamily("flux", "Flux", FLUX, (16, 16, 16), {"pooled_output": (TEXT,)}, ("double_block", "single_block")),
    TinyFamily("flux_schnell", "FluxSchnell", {**FLUX, "guidance_embed": False}, (16, 16, 16),
               {"pooled_output": (TEXT,)}, ("double_block", "single_block")),
    TinyFamily("flux2", "Flux2", {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
                                  "context_in_dim": TEXT, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2,
                                  "depth": 2, "depth_single_blocks": 3, "axes_dim": [8, 8, 8, 8], "theta": 2000,
                                  "patch_size": 1, "qkv_bias": False, "guidance_embed": True, "txt_ids_dims": [3],
                                  "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
                                  "default_ref_method": "index", "ref_index_scale": 10.0},
               (128, 8, 8), {"pooled_output": None}, ("double_block", "single_block")),
    TinyFamily("chroma", "Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64,
                                    "context_in_dim": TEXT, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
                                    "depth": 2, "depth_single_blocks": 3, "axes_dim": [8, 12, 12], "theta": 10000,
                                    "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
                                    "hidden_dim": 64, "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": None},
               (16, 16, 16), {"pooled_output": None}, ("double_block", "single_block")),
    TinyFamily("sd3", "SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 5, "input_size": None,
                              "adm_in_channels": TEXT, "pos_embed_scaling_factor": None, "num_patches": None,
                              "pos_embed_max_size": None,
                              "context_embedder_config": {"target": "torch.nn.Linear",
                                                          "params": {"in_features": TEXT, "out_features": 320}},
                              "x_block_self_attn_layers": []},
               (16, 16, 16), {"pooled_output": (TEXT,)}, ("double_block",)),
    TinyFamily("qwen_image", "QwenImage", {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64,
                                           "out_channels": 16, "num_layers": 5, "attention_head_dim": 32,
                                           "num_attention_heads": 2, "joint_attention_dim": TEXT,
                                           "axes_dims_rope": (8, 12, 12)},
               (16, 1, 16, 16), {}, ("double_block",)),
    TinyFamily("lumina2", "Lumina2", LUMINA2, (16, 16, 16)),
    TinyFamily("z_image", "ZImage", {**LUMINA2, "dim": 256, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24],
                                     "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
                                     "time_scale": 1000.0}, (16, 16, 16)),
    TinyFamily("hidream", "HiDream", {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
                                      "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 32,
                                      "num_attention_heads": 2, "caption_channels": [TEXT, TEXT], "text_emb_dim": TEXT,
                                      "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8],
                                      "max_resolution": [32, 32], "llama_layers": [0, 1, 2]},
               (16, 16, 16), {"pooled_output": (TEXT,), "conditioning_llama3": (3, TOKENS, TEXT)}),
    TinyFamily("aura_flow", "AuraFlow", {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 5,
                                         "n_double_layers": 2, "n_heads": 2, "global_conddim": 64, "cond_seq_dim": TEXT,
                                         "max_seq": 256}, (4, 16, 16), {}, ("double_block", "single_block")),
    TinyFamily("kandinsky5_image", "Kandinsky5Image", {"image_model": "kandinsky5", "in_visual_dim": 16,
                                                       "out_visual_dim": 16, "in_text_dim": TEXT, "in_text_dim2": TEXT,
                                                       "time_dim": 32, "model_dim": 64, "ff_dim": 128,
                                                       "visual_embed_dim": 64, "patch_size": (1, 2, 2),
                                                       "num_text_blocks": 1, "num_visual_blocks": 5,
                                                       "axes_dims": (8, 12, 12), "rope_scale_factor": (1.0, 1.0, 1.0)},
               # ComfyUI 0.8.0's block_wrap calls these blocks with x= / context=, which their forward does not take:
               # a block-replace patch that runs a block raises, so the pack offers no block fill here
               (16, 16, 16), {"pooled_output": (TEXT,)}),
    TinyFamily("wan21", "WAN21_T2V", WAN21, (16, 3, 8, 8), {}, ("double_block",)),
    TinyFamily("wan22", "WAN22_T2V", {**WAN21, "in_dim": 48, "out_dim": 48}, (48, 3, 8, 8), {}, ("double_block",)),
    TinyFamily("hunyuan_video", "HunyuanVideo", {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
                                                 "vec_in_dim": TEXT, "context_in_dim": TEXT, "hidden_size": 64,
                                                 "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3,
                                                 "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
                                                 "qkv_bias": True, "guidance_embed": True, "byt5": False,
                                                 "meanflow": False, "use_cond_type_embedding": False,
                                                 "vision_in_dim": None, "meanflow_sum": False},
               (16, 3, 8, 8), {"pooled_output": (TEXT,)}, ("double_block", "single_block")),
    TinyFamily("ltxv", "LTXV", {"image_model": "ltxv", "in_channels": 128, "num_layers": 5, "attention_head_dim": 32,
                                "num_attention_heads": 2, "cross_attention_dim": 64, "caption_channels": TEXT},
               (128, 2, 4, 4), {"attention_mask": "ones"}, ("double_block",)),
]}


def build(host, family: TinyFamily, seed: int = 0):
    """A ModelPatcher of ComfyUI's own class for ``family``, with random weights."""
    comfy = host.comfy
    config = getattr(comfy.supported_models, family.config_class)(dict(family.unet_config))
    model = config.get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def conditioning(family: TinyFamily, seed: int, batch: int = 1):
    """ComfyUI's conditioning list for ``family``: the text embedding and the extra inputs its class reads."""
    g = torch.Generator().manual_seed(seed)
    extra = {}
    for name, shape in family.extra_cond.items():
        if shape is None:
            extra[name] = None
        elif shape == "ones":
            extra[name] = torch.ones(batch, TOKENS, dtype=torch.long)  # a token mask, as the text encoder gives it
        else:
            extra[name] = torch.randn(batch, *shape, generator=g)
    return [[torch.randn(batch, TOKENS, TEXT, generator=g), extra]]


def latent(family: TinyFamily, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, *family.latent)
