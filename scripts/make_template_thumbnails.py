"""Writes example_workflows/<template>.jpg, the thumbnail ComfyUI's template browser shows: the template's
graph as the real frontend draws it.

Run with ComfyUI's Python (playwright installed) and Chromium present:
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python scripts/make_template_thumbnails.py [TEMPLATE ...]

With template names (file stems), only those thumbnails are written.
"""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_frontend  # noqa: E402

if __name__ == "__main__":
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui or comfy_frontend.find_chromium() is None:
        raise SystemExit("error: set COMFYUI_PATH to a ComfyUI checkout and install Chromium (apt-get install chromium)")
    out = comfy_frontend.REPO / "example_workflows"
    with tempfile.TemporaryDirectory() as base:
        with comfy_frontend.comfy_server(Path(comfyui), Path(base)) as url, \
                comfy_frontend.frontend(url, width=1600, height=1000) as page:
            wanted = set(sys.argv[1:])
            for path in sorted(p for p in out.glob("*.json") if not wanted or p.stem in wanted):
                comfy_frontend.load_template(page, url, path.stem)
                comfy_frontend.close_dialogs(page)
                comfy_frontend.fit_view(page)
                page.screenshot(path=str(path.with_suffix(".jpg")), clip=comfy_frontend.graph_clip(page), type="jpeg",
                                quality=75)
                print("wrote", path.with_suffix(".jpg").name)
