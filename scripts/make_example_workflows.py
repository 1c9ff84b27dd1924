"""Writes example_workflows/*.json (ComfyUI's UI workflow format), the templates ComfyUI lists for the pack.

Run: python scripts/make_example_workflows.py   (thumbnails: python scripts/make_template_thumbnails.py)

Kept as code so the wiring is written once and the files stay consistent. Every template runs as loaded on
a fresh install with the pack alone: the fills are training-free, and where a Dot is shown its loader is
muted (a note says how to train one and unmute it). Nodes are placed in columns from their sizes, so no two
overlap (tests/test_example_workflows.py checks the rectangles; the frontend test checks them as drawn).
"""
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "example_workflows"

# (input name, type) and (output name, type) of the nodes used; widget values in UI order
SPECS = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")]),
    "KSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        [("LATENT", "LATENT")],
    ),
    "MorseKSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT"),
         ("dot", "DOT_MODEL"), ("schedule", "MORSE_SCHEDULE")],
        [("LATENT", "LATENT")],
    ),
    "MorseLoadDotModel": ([], [("DOT_MODEL", "DOT_MODEL")]),
    "MorseDashDotSchedule": ([], [("MORSE_SCHEDULE", "MORSE_SCHEDULE"), ("description", "STRING")]),
    "PreviewAny": ([("source", "*")], []),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "ModelSamplingSD3": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "EmptyHunyuanLatentVideo": ([], [("LATENT", "LATENT")]),
    "SaveAnimatedWEBP": ([("images", "IMAGE")], []),
    "Note": ([], []),
}
# width, height as the frontend draws them (at least its computed minimum for the widgets)
SIZES = {
    "CheckpointLoaderSimple": (320, 100), "CLIPTextEncode": (400, 200), "EmptyLatentImage": (320, 110),
    "EmptySD3LatentImage": (320, 110), "FluxGuidance": (320, 60),
    "LoadImage": (320, 330), "VAEEncode": (210, 50), "KSampler": (320, 270), "MorseKSampler": (340, 400),
    "MorseLoadDotModel": (340, 60), "MorseDashDotSchedule": (340, 320), "PreviewAny": (340, 160),
    "VAEDecode": (210, 50), "SaveImage": (320, 300), "Note": (400, 220),
    "UNETLoader": (320, 100), "CLIPLoader": (320, 130), "VAELoader": (320, 60), "ModelSamplingSD3": (320, 60),
    "EmptyHunyuanLatentVideo": (320, 150), "SaveAnimatedWEBP": (320, 380),
}
COLUMNS = (40, 480, 940, 1340, 1620)  # x of each column: loaders, prompts/Morse inputs, samplers, decode, save
GAP = 50  # vertical space between nodes (the title bar is drawn above a node's position)
MUTED = 2  # the frontend's mode "never": the node and its links are left out of the prompt

SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"}
SDXL = {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"}

# Comfy-Org's single-file Flux checkpoints (model, both text encoders and the VAE), which Load Checkpoint reads
FLUX_DEV = {"name": "flux1-dev-fp8.safetensors", "directory": "checkpoints",
            "url": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors"}

# Comfy-Org's repackaged Wan 2.1 files, as ComfyUI's own Wan template loads them (model, UMT5 text encoder, VAE apart)
WAN_REPO = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
WAN_T2V_13B = {"name": "wan2.1_t2v_1.3B_fp16.safetensors", "directory": "diffusion_models",
               "url": f"{WAN_REPO}/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"}
WAN_UMT5 = {"name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "directory": "text_encoders",
            "url": f"{WAN_REPO}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"}
WAN_VAE = {"name": "wan_2.1_vae.safetensors", "directory": "vae", "url": f"{WAN_REPO}/vae/wan_2.1_vae.safetensors"}


class Workflow:
    def __init__(self):
        self.nodes, self.links = [], []
        self.next_y = {x: 40 for x in COLUMNS}

    def add(self, type_, column, widgets, title=None, mode=0, properties=None, height=None):
        inputs, outputs = SPECS[type_]
        x = COLUMNS[column]
        w, h = SIZES[type_]
        h = height or h
        node = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "pos": [x, self.next_y[x]],
            "size": [w, h],
            "flags": {},
            "order": len(self.nodes),
            "mode": mode,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_, **(properties or {})},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.next_y[x] += h + GAP
        self.nodes.append(node)
        return node

    def skip_to(self, column, y):
        """Start the next node of ``column`` no higher than ``y`` (to line a branch up with another)."""
        x = COLUMNS[column]
        self.next_y[x] = max(self.next_y[x], y)

    def link(self, src, out_name, dst, in_name):
        out_slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == out_name)
        in_slot = next(i for i, o in enumerate(dst["inputs"]) if o["name"] == in_name)
        link_id = len(self.links) + 1
        type_ = src["outputs"][out_slot]["type"]
        self.links.append([link_id, src["id"], out_slot, dst["id"], in_slot, type_])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][in_slot]["link"] = link_id

    def dump(self, name, note):
        data = {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"morse_note": note},
            "version": 0.4,
        }
        (OUT / name).write_text(json.dumps(data, indent=1) + "\n")


def checkpoint(wf, model):
    return wf.add("CheckpointLoaderSimple", 0, [model["name"]], properties={"models": [model]})


def prompts(wf, ckpt, positive, negative):
    pos = wf.add("CLIPTextEncode", 1, [positive], "Positive")
    neg = wf.add("CLIPTextEncode", 1, [negative], "Negative")
    wf.link(ckpt, "CLIP", pos, "clip")
    wf.link(ckpt, "CLIP", neg, "clip")
    return pos, neg


def schedule(wf, kind, steps, pattern="D.", k=2):
    sched = wf.add("MorseDashDotSchedule", 1, [kind, k, 0.5, pattern, 0, 10.0, 0.0, steps, 0.2])
    preview = wf.add("PreviewAny", 1, [], "Schedule preview")
    wf.link(sched, "description", preview, "source")
    return sched


def morse_sampler(wf, ckpt, pos, neg, latent, sched, steps, cfg, sampler, scheduler, denoise, fill, prior_noise=0.0, dot=None):
    ks = wf.add("MorseKSampler", 2, [7, "fixed", steps, cfg, sampler, scheduler, denoise, fill, False, prior_noise, "off"])
    wf.link(ckpt, "MODEL", ks, "model")
    wf.link(pos, "CONDITIONING", ks, "positive")
    wf.link(neg, "CONDITIONING", ks, "negative")
    wf.link(latent, "LATENT", ks, "latent_image")
    wf.link(sched, "MORSE_SCHEDULE", ks, "schedule")
    if dot is not None:
        wf.link(dot, "DOT_MODEL", ks, "dot")
    return ks


def plain_sampler(wf, ckpt, pos, neg, latent, steps, cfg, sampler, scheduler, denoise):
    ks = wf.add("KSampler", 2, [7, "fixed", steps, cfg, sampler, scheduler, denoise], "KSampler (for comparison)")
    wf.link(ckpt, "MODEL", ks, "model")
    wf.link(pos, "CONDITIONING", ks, "positive")
    wf.link(neg, "CONDITIONING", ks, "negative")
    wf.link(latent, "LATENT", ks, "latent_image")
    return ks


def decode_save(wf, ckpt, sampler_node, prefix, video_fps=None):
    """VAEDecode and SaveImage (``video_fps``: SaveAnimatedWEBP at that frame rate) beside ``sampler_node``."""
    wf.skip_to(3, sampler_node["pos"][1])
    wf.skip_to(4, sampler_node["pos"][1])
    dec = wf.add("VAEDecode", 3, [])
    if video_fps is None:
        save = wf.add("SaveImage", 4, [prefix])
    else:
        save = wf.add("SaveAnimatedWEBP", 4, [prefix, video_fps, False, 90, "default"])
    wf.skip_to(3, save["pos"][1] + save["size"][1] + GAP)  # the next pair starts below this one
    wf.link(sampler_node, "LATENT", dec, "samples")
    wf.link(ckpt, "VAE", dec, "vae")
    wf.link(dec, "IMAGE", save, "images")


def txt2img(name, model, size, steps, cfg, fill, kind, note, pattern="D.", prior_noise=0.0, with_dot=False,
            sampler="euler", scheduler="normal"):
    wf = Workflow()
    wf.add("Note", 0, [note], "About this template", height=300)
    ckpt = checkpoint(wf, model)
    latent = wf.add("EmptyLatentImage", 0, [size, size, 1])
    dot = None
    if with_dot:
        wf.add("Note", 0, [DOT_NOTE], "How to use a Dot", height=260)
        dot = wf.add("MorseLoadDotModel", 0, ["my_checkpoint_dot.safetensors"], "Load Dot Model (muted: unmute with Ctrl+M)",
                     mode=MUTED)
    pos, neg = prompts(wf, ckpt, "a lighthouse on a cliff at sunset, detailed, photograph", "blurry, low quality")
    sched = schedule(wf, kind, steps, pattern)
    morse = morse_sampler(wf, ckpt, pos, neg, latent, sched, steps, cfg, sampler, scheduler, 1.0, fill, prior_noise, dot)
    decode_save(wf, ckpt, morse, "morse")
    wf.skip_to(2, wf.next_y[COLUMNS[3]])
    plain = plain_sampler(wf, ckpt, pos, neg, latent, steps, cfg, sampler, scheduler, 1.0)
    decode_save(wf, ckpt, plain, "ksampler")
    wf.dump(name, note)


def flux_txt2img(name, model, steps, fill, note, guidance=3.5, pattern="D."):
    """Flux-dev as ComfyUI's own Flux example runs it: CFG 1 (guidance-distilled: one cond a step, the negative
    prompt unused), the guidance as FluxGuidance on the positive, euler / simple, a 1024 px SD3-style latent."""
    wf = Workflow()
    wf.add("Note", 0, [note], "About this template", height=300)
    ckpt = checkpoint(wf, model)
    latent = wf.add("EmptySD3LatentImage", 0, [1024, 1024, 1])
    pos, neg = prompts(wf, ckpt, "a lighthouse on a cliff at sunset, detailed, photograph", "")
    neg["title"] = "Negative (unused at CFG 1)"
    guided = wf.add("FluxGuidance", 1, [guidance])
    wf.link(pos, "CONDITIONING", guided, "conditioning")
    sched = schedule(wf, "pattern", steps, pattern)
    morse = morse_sampler(wf, ckpt, guided, neg, latent, sched, steps, 1.0, "euler", "simple", 1.0, fill)
    decode_save(wf, ckpt, morse, "morse_flux")
    wf.skip_to(2, wf.next_y[COLUMNS[3]])
    plain = plain_sampler(wf, ckpt, guided, neg, latent, steps, 1.0, "euler", "simple", 1.0)
    decode_save(wf, ckpt, plain, "ksampler_flux")
    wf.dump(name, note)


def wan_t2v(name, steps, fill, note, pattern="D."):
    """Wan 2.1 t2v 1.3B as ComfyUI's own Wan template runs it: the model, UMT5 and the VAE from their own loaders,
    shift 8 (ModelSamplingSD3), 832x480 and 33 frames, uni_pc / simple, CFG 6, a 16 fps animated WebP."""
    wf = Workflow()
    wf.add("Note", 0, [note], "About this template", height=300)
    unet = wf.add("UNETLoader", 0, [WAN_T2V_13B["name"], "default"], properties={"models": [WAN_T2V_13B]})
    clip = wf.add("CLIPLoader", 0, [WAN_UMT5["name"], "wan", "default"], properties={"models": [WAN_UMT5]})
    vae = wf.add("VAELoader", 0, [WAN_VAE["name"]], properties={"models": [WAN_VAE]})
    model = wf.add("ModelSamplingSD3", 0, [8.0])
    wf.link(unet, "MODEL", model, "model")
    latent = wf.add("EmptyHunyuanLatentVideo", 0, [832, 480, 33, 1])
    pos, neg = prompts(wf, clip, "a red fox running through fresh snow in a forest, morning light, cinematic",
                       "blurry, static, low quality, distorted")
    sched = schedule(wf, "pattern", steps, pattern)
    morse = morse_sampler(wf, model, pos, neg, latent, sched, steps, 6.0, "uni_pc", "simple", 1.0, fill)
    decode_save(wf, vae, morse, "morse_wan", video_fps=16.0)
    wf.skip_to(2, wf.next_y[COLUMNS[3]])
    plain = plain_sampler(wf, model, pos, neg, latent, steps, 6.0, "uni_pc", "simple", 1.0)
    decode_save(wf, vae, plain, "ksampler_wan", video_fps=16.0)
    wf.dump(name, note)


def img2img(name, model, note):
    wf = Workflow()
    wf.add("Note", 0, [note], "About this template", height=240)
    ckpt = checkpoint(wf, model)
    image = wf.add("LoadImage", 0, ["example.png", "image"])
    encode = wf.add("VAEEncode", 0, [])
    wf.link(image, "IMAGE", encode, "pixels")
    wf.link(ckpt, "VAE", encode, "vae")
    pos, neg = prompts(wf, ckpt, "an oil painting of the same scene", "blurry, low quality")
    sched = schedule(wf, "pattern", 30, "D.")
    morse = morse_sampler(wf, ckpt, pos, neg, encode, sched, 30, 7.0, "dpmpp_2m", "karras", 0.6, "inherit_k2")
    decode_save(wf, ckpt, morse, "morse_img2img")
    wf.dump(name, note)


DOT_NOTE = (
    "A Dot is trained for one checkpoint; none ships for SD models, so this loader is muted and the Morse KSampler "
    "fills the non-Dash steps training-free (fill_without_dot) until you have one.\n\n"
    "1. From ComfyUI/custom_nodes/comfyui-morse, with ComfyUI's Python:\n"
    "   python -m pip install -r requirements-train.txt\n"
    "   python -m training.train_dot --checkpoint ../../models/checkpoints/<your model>.safetensors --prompts prompts.txt\n"
    "2. Press R to refresh, pick the new file in Load Dot Model, unmute it (select it, Ctrl+M) and Run."
)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    txt2img(
        "morse_faster_diffusion_sd15.json", SD15, 512, 50, 7.0, "propagate", "faster_diffusion",
        "Faster Diffusion on Morse KSampler (top), training-free: the checkpoint runs the full UNet on the paper's 9 key "
        "steps of 50, and the other steps run only its decoder on the last key step's encoder features (on a GPU the "
        "steps up to the next key step are decoded in one batched call), with prior noise injection 0.003. Below: the same 50 steps in KSampler, to compare "
        "image and time. The console prints a 'Morse:' line with the steps and LSD spent.",
        prior_noise=0.003,
    )
    txt2img(
        "morse_feature_inheritance_sd15.json", SD15, 512, 30, 7.0, "inherit_k2", "pattern",
        "Feature inheritance (A-SDM / DeepCache's shallow branch) on Morse KSampler (top), training-free: every other "
        "step reruns only the outer 2 UNet blocks per side at full resolution and inherits the deeper features from "
        "the last full step (pattern D.). Try inherit_k1 for more speed, or another pattern. Below: KSampler.",
    )
    txt2img(
        "morse_dot_sd15.json", SD15, 512, 20, 7.0, "extrapolate", "pattern",
        "Morse with a Dot (the paper's method): the Dot fills every other step with a learned residual on the last "
        "Dash estimate. Until you train a Dot for your checkpoint the loader is muted and the other steps are "
        "extrapolated from the last two Dash estimates (free). Below: KSampler.",
        with_dot=True,
    )
    img2img(
        "morse_img2img_sd15.json", SD15,
        "img2img at denoise 0.6 with Morse KSampler, DPM++ 2M Karras and feature inheritance (inherit_k2) on every "
        "other step; training-free. Load your own image in Load Image.",
    )
    txt2img(
        "morse_faster_diffusion_sdxl.json", SDXL, 1024, 50, 6.0, "propagate", "faster_diffusion",
        "SDXL at 1024 px with Faster Diffusion on Morse KSampler (top), training-free: full UNet on the 9 key steps of "
        "50, the decoder alone on the others. Below: KSampler with the same 50 steps.",
        prior_noise=0.003,
    )
    flux_txt2img(
        "morse_block_forecast_flux.json", FLUX_DEV, 20, "forecast_k1",
        "Flux-dev at 1024 px with Morse KSampler (top), training-free: every other step runs only the first and last "
        "of Flux's 57 blocks and forecasts the residual across the 55 between from the last two full steps "
        "(forecast_k1, through ComfyUI's block-replace patches; a k=1 step costs 1/28 of a full one at this size on "
        "a CPU, reports/2026-12-07-dit-latency). CFG 1 as Flux-dev is meant to run, guidance 3.5. Below: KSampler "
        "with the same 20 steps. The console prints a 'Morse:' line with the steps and LSD spent.",
    )
    wan_t2v(
        "morse_block_forecast_wan_t2v.json", 30, "forecast_k1",
        "Wan 2.1 text-to-video (1.3B, 832x480, 33 frames) with Morse KSampler (top), training-free: every other step "
        "runs only the first and last of Wan's 30 blocks and forecasts the residual across the 28 between from the "
        "last two full steps (forecast_k1, through ComfyUI's block-replace patches; a k=1 step costs 1/15 of a full "
        "one at this size on a CPU, reports/2026-12-07-dit-latency). uni_pc, CFG 6, shift 8 as ComfyUI's own Wan "
        "template. Below: KSampler with the same 30 steps. The console prints a 'Morse:' line with the steps and LSD "
        "spent.",
    )
    print("wrote", sorted(p.name for p in OUT.glob("*.json")))
