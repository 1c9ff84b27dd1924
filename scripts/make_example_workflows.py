"""Writes example_workflows/*.json (ComfyUI's UI workflow format) from one description each.

Run: python scripts/make_example_workflows.py
Kept as code so the node wiring is written once and the files stay consistent.
"""
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "example_workflows"

# (input name, type) and (output name, type) of the nodes used; widget values in UI order
SPECS = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
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
}


class Workflow:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, pos, widgets, title=None):
        inputs, outputs = SPECS[type_]
        node = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "pos": list(pos),
            "size": [320, 130],
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

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


def text_encoders(wf, ckpt, positive, negative):
    pos = wf.add("CLIPTextEncode", (420, 60), [positive], "Positive")
    neg = wf.add("CLIPTextEncode", (420, 260), [negative], "Negative")
    wf.link(ckpt, "CLIP", pos, "clip")
    wf.link(ckpt, "CLIP", neg, "clip")
    return pos, neg


def morse_branch(wf, ckpt, pos, neg, latent, latent_out, dot_file, y, steps, cfg, sampler, scheduler, denoise, pattern):
    dot = wf.add("MorseLoadDotModel", (420, y), [dot_file])
    sched = wf.add("MorseDashDotSchedule", (420, y + 170), ["pattern", 2, 0.5, pattern, 1, 10.0, 0.0, steps])
    preview = wf.add("PreviewAny", (420, y + 480), [])
    ks = wf.add("MorseKSampler", (800, y), [7, "fixed", steps, cfg, sampler, scheduler, denoise, "reuse", False])
    wf.link(ckpt, "MODEL", ks, "model")
    wf.link(pos, "CONDITIONING", ks, "positive")
    wf.link(neg, "CONDITIONING", ks, "negative")
    wf.link(latent, latent_out, ks, "latent_image")
    wf.link(dot, "DOT_MODEL", ks, "dot")
    wf.link(sched, "MORSE_SCHEDULE", ks, "schedule")
    wf.link(sched, "description", preview, "source")
    return ks


def decode_save(wf, ckpt, sampler_node, y, prefix):
    dec = wf.add("VAEDecode", (1160, y), [])
    save = wf.add("SaveImage", (1400, y), [prefix])
    wf.link(sampler_node, "LATENT", dec, "samples")
    wf.link(ckpt, "VAE", dec, "vae")
    wf.link(dec, "IMAGE", save, "images")


def txt2img(name, ckpt_name, dot_file, size, steps, cfg, note):
    wf = Workflow()
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), [ckpt_name])
    pos, neg = text_encoders(wf, ckpt, "a lighthouse on a cliff at sunset, detailed, photograph", "blurry, low quality")
    latent = wf.add("EmptyLatentImage", (40, 420), [size, size, 1])
    plain = wf.add("KSampler", (800, 620), [7, "fixed", steps, cfg, "euler", "normal", 1.0], "KSampler (for comparison)")
    wf.link(ckpt, "MODEL", plain, "model")
    wf.link(pos, "CONDITIONING", plain, "positive")
    wf.link(neg, "CONDITIONING", plain, "negative")
    wf.link(latent, "LATENT", plain, "latent_image")
    morse = morse_branch(wf, ckpt, pos, neg, latent, "LATENT", dot_file, 40, steps, cfg, "euler", "normal", 1.0, "D.")
    decode_save(wf, ckpt, morse, 40, "morse")
    decode_save(wf, ckpt, plain, 620, "ksampler")
    wf.dump(name, note)


def img2img(name, ckpt_name, dot_file, note):
    wf = Workflow()
    ckpt = wf.add("CheckpointLoaderSimple", (40, 200), [ckpt_name])
    pos, neg = text_encoders(wf, ckpt, "an oil painting of the same scene", "blurry, low quality")
    image = wf.add("LoadImage", (40, 420), ["example.png", "image"])
    encode = wf.add("VAEEncode", (40, 760), [])
    wf.link(image, "IMAGE", encode, "pixels")
    wf.link(ckpt, "VAE", encode, "vae")
    morse = morse_branch(wf, ckpt, pos, neg, encode, "LATENT", dot_file, 40, 30, 7.0, "dpmpp_2m", "karras", 0.6, "D.")
    decode_save(wf, ckpt, morse, 40, "morse_img2img")
    wf.dump(name, note)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    txt2img(
        "morse_txt2img_sd15.json", "v1-5-pruned-emaonly.safetensors", "sd15_dot.safetensors", 512, 20, 7.0,
        "SD1.5 txt2img: Morse KSampler (top) next to the same settings in KSampler (bottom). Train sd15_dot.safetensors "
        "for your checkpoint with python -m training.train_dot and put it in models/dot_models.",
    )
    img2img(
        "morse_img2img_sd15.json", "v1-5-pruned-emaonly.safetensors", "sd15_dot.safetensors",
        "SD1.5 img2img at denoise 0.6 with Morse KSampler and DPM++ 2M Karras.",
    )
    txt2img(
        "morse_txt2img_sdxl.json", "sd_xl_base_1.0.safetensors", "sdxl_dot.safetensors", 1024, 25, 6.0,
        "SDXL txt2img at 1024 px: Morse KSampler next to KSampler. Needs a Dot trained for your SDXL checkpoint.",
    )
    print("wrote", sorted(p.name for p in OUT.glob("*.json")))
