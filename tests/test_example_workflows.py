"""The templates as files: laid out without overlapping nodes, wired consistently, and runnable on a fresh install
(no active node that needs a file the pack does not ship). Loading and queueing them in the real frontend is
tests/host/test_templates_frontend.py."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "example_workflows").glob("*.json"))
TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its position


def rectangles(workflow):
    return [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in workflow["nodes"]]


def overlaps(rects):
    return [(a[0], b[0]) for i, a in enumerate(rects) for b in rects[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


def test_there_is_a_template_per_fill_and_a_thumbnail_for_each():
    names = {p.stem for p in TEMPLATES}
    assert {"morse_faster_diffusion_sd15", "morse_feature_inheritance_sd15", "morse_dot_sd15", "morse_img2img_sd15",
            "morse_faster_diffusion_sdxl", "morse_block_forecast_flux", "morse_block_forecast_wan_t2v"} <= names
    fills = {n["widgets_values"][7] for p in TEMPLATES for n in json.loads(p.read_text())["nodes"] if n["type"] == "MorseKSampler"}
    assert {"propagate", "inherit_k2", "extrapolate", "forecast_k1"} <= fills
    for p in TEMPLATES:
        thumb = p.with_suffix(".jpg")
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{p.name} has no JPEG thumbnail"


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_no_two_nodes_overlap(path):
    workflow = json.loads(path.read_text())
    assert not overlaps(rectangles(workflow)), path.name


def test_the_overlap_check_catches_an_overlap():
    a = {"id": 1, "pos": [0, 100], "size": [100, 100]}
    b = {"id": 2, "pos": [50, 150], "size": [100, 100]}
    c = {"id": 3, "pos": [0, 220], "size": [100, 100]}  # below a, but its title bar reaches into a
    assert overlaps(rectangles({"nodes": [a, b]})) == [(1, 2)]
    assert overlaps(rectangles({"nodes": [a, c]})) == [(1, 3)]


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_links_are_consistent_and_nothing_active_needs_a_file_the_pack_lacks(path):
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, out_slot, dst, in_slot, _type in workflow["links"]:
        assert link_id in nodes[src]["outputs"][out_slot]["links"]
        assert nodes[dst]["inputs"][in_slot]["link"] == link_id
    for n in nodes.values():
        if n["type"] == "MorseLoadDotModel":
            assert n["mode"] == 2, "an active Load Dot Model needs a Dot a fresh install does not have"
    assert any(n["type"] == "Note" for n in nodes.values())
    # every model file the template loads says where to download it (ComfyUI offers the download when it is missing)
    loaders = [n for n in nodes.values() if n["type"] in ("CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader")]
    assert loaders and all(n["properties"]["models"][0]["url"].startswith("https://") for n in loaders)
    assert all(n["properties"]["models"][0]["name"] == n["widgets_values"][0] for n in loaders)
