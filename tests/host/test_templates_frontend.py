"""Every template in the real frontend (headless Chromium through playwright), as a new user meets it: loaded
from the template list with no missing node, laid out with no two nodes overlapping as drawn, and queued with
Run on substitute models (tiny SD1.5, SDXL and Flux checkpoints, and Wan 2.1's three files, saved under the names the
templates ask for)
until the server finishes it with no red node."""
import sys
import textwrap
from pathlib import Path

import pytest

from comfy_host import COMFYUI_PATH, REPO
from host_required import host_missing
from tiny_checkpoints import tiny_families, write_tiny_checkpoint, write_tiny_wan_files

sys.path.insert(0, str(REPO / "scripts"))
import comfy_frontend  # noqa: E402

def _small_latents(page, px=128, frames=5):
    """Empty latents of ``px`` pixels (and ``frames`` for video), set in the loaded graph's widgets as a user would:
    the substitute models are tiny, but at 512 or 1024 px (or 33 frames) a CPU would still take minutes a template."""
    page.evaluate("""([px, frames]) => {
        const g = window.app.graph;
        const empty = ["EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"];
        for (const n of (g.nodes ?? g._nodes)) {
            if (!empty.includes(n.type)) continue;
            for (const w of n.widgets) {
                if (w.name === "width" || w.name === "height") w.value = px;
                if (w.name === "length") w.value = frames;
            }
        }
    }""", [px, frames])


TEMPLATES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


def _registers_tiny_families(base: Path) -> None:
    """A custom node for the server process that teaches ComfyUI's detection the tiny families (first in its list),
    and its Wan text-encoder loader the tiny UMT5's sizes."""
    node = base / "custom_nodes" / "tiny_families_for_tests"
    node.mkdir(parents=True)
    (node / "__init__.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import comfy
        import comfy.supported_models
        from tiny_checkpoints import tiny_families, tiny_umt5_loadable

        class _Host:
            comfy = comfy

        comfy.supported_models.models[:0] = [cls for cls, _ in tiny_families(_Host).values()]
        UMT5_SIZES = tiny_umt5_loadable()  # kept: entered for the server's life (CLIPLoader builds the tiny UMT5)
        UMT5_SIZES.__enter__()
        NODE_CLASS_MAPPINGS = {{}}
    """))


@pytest.fixture(scope="module")
def page_and_url(host, tmp_path_factory):
    if comfy_frontend.find_chromium() is None:
        host_missing("no Chromium here (apt-get install chromium): the frontend test needs a browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        host_missing("the frontend test drives Chromium through playwright (pip install playwright)")
    import json

    base = tmp_path_factory.mktemp("comfy_base")
    families = tiny_families(host)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    wan_files = {}  # the Wan template's three loaders: diffusion model, text encoder, VAE
    for path in (REPO / "example_workflows").glob("*.json"):
        for n in json.loads(path.read_text())["nodes"]:
            if n["type"] == "CheckpointLoaderSimple" and not (checkpoints / n["widgets_values"][0]).exists():
                name = n["widgets_values"][0]
                family = "flux" if "flux" in name else "sdxl" if "xl" in name else "sd15"
                write_tiny_checkpoint(host, families, family, checkpoints / n["widgets_values"][0])
            folder = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae"}.get(n["type"])
            if folder:
                (base / "models" / folder).mkdir(parents=True, exist_ok=True)
                wan_files[n["type"]] = base / "models" / folder / n["widgets_values"][0]
    if wan_files:
        write_tiny_wan_files(host, families, wan_files["UNETLoader"], wan_files["CLIPLoader"], wan_files["VAELoader"])
    (base / "input").mkdir()
    from PIL import Image  # ComfyUI's own dependency

    # ComfyUI's example.png at 128 px: the tiny models sample 16x16 latents in seconds on a CPU
    Image.open(Path(COMFYUI_PATH) / "input" / "example.png").convert("RGB").resize((128, 128)).save(base / "input" / "example.png")
    _registers_tiny_families(base)
    with comfy_frontend.comfy_server(Path(COMFYUI_PATH), base) as url, comfy_frontend.frontend(url) as page:
        yield page, url


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_template_loads_lays_out_runs_and_finishes_with_no_red_node(page_and_url, name):
    page, url = page_and_url
    comfy_frontend.load_template(page, url, name)
    nodes = comfy_frontend.drawn_nodes(page)
    assert nodes and not [n["type"] for n in nodes if n["missing"]], "missing node types"
    rects = [(n["id"], *n["rect"]) for n in nodes]
    overlapping = [(a[0], b[0]) for i, a in enumerate(rects) for b in rects[i + 1:]
                   if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]
    assert not overlapping, f"nodes overlap as drawn: {overlapping}"
    _small_latents(page)
    result = comfy_frontend.run_loaded(page, url)
    assert result["node_errors"] is None, f"red nodes: {result['node_errors']}"
    assert result["status"]["status_str"] == "success", result["status"]
    assert not [n["title"] for n in comfy_frontend.drawn_nodes(page) if n["error"]]
    saved = [img for out in result["outputs"].values() for img in out.get("images", [])]
    assert saved, "the template saved no image"
