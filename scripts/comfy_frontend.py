"""A real ComfyUI server with this pack, and its web frontend in headless Chromium (playwright).

Loads a template as the template browser does (the JSON from /api/workflow_templates, then
``app.loadGraphData``), reads what the canvas holds, queues it with the frontend's own Run, and waits
for the server to finish it. Used by tests/host/test_templates_frontend.py and
scripts/make_template_thumbnails.py; needs ComfyUI's Python with playwright, and Chromium.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what a user who has been here before has: no template browser on start, no minimap, no missing-model notice
# (the checkpoints of a template are the user's to download)
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
            "Comfy.Workflow.ShowMissingModelsWarning": False}
MODULE = "comfyui-morse"  # the name ComfyUI lists the pack's templates under (its folder in custom_nodes)
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    return next((p for p in CHROMIUM if os.path.exists(p)), None) or shutil.which("chromium")


def get_json(url: str, data: dict | None = None):
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def comfy_server(comfyui: Path, base: Path, python: str = sys.executable, startup_s: float = 180):
    """ComfyUI with the pack (and whatever else is in ``base``/custom_nodes) on a free port; yields its URL.
    ``base`` is ComfyUI's --base-directory: models, input, output and user data live there."""
    nodes = base / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    user = base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    if not (nodes / MODULE).exists():
        os.symlink(REPO, nodes / MODULE)
    port = _free_port()
    log_path = base / "comfyui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
             "--disable-auto-launch"],
            cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + startup_s
            while True:
                try:
                    get_json(f"{url}/object_info/KSampler")
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError("ComfyUI did not start:\n" + log_path.read_text()[-3000:]) from None
                    time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def frontend(url: str, width: int = 1700, height: int = 1100):
    """A page of the frontend at ``url`` once its app and graph exist."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
            yield page
        finally:
            browser.close()


def load_template(page, url: str, name: str) -> None:
    workflow = get_json(f"{url}/api/workflow_templates/{MODULE}/{name}.json")
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name) }", [workflow, name])
    page.wait_for_timeout(500)  # let the canvas lay the nodes out


def drawn_nodes(page) -> list[dict]:
    """Each node as the frontend holds it: its type, mode, rectangle (with the title bar above ``pos``), whether
    its type is unknown to the frontend (a missing node) and whether it is marked with an error (red)."""
    return page.evaluate("""() => {
        const g = window.app.graph, title = window.LiteGraph.NODE_TITLE_HEIGHT;
        return (g.nodes ?? g._nodes).map(n => ({
            id: n.id, type: n.type, mode: n.mode, title: n.title,
            rect: [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]],
            missing: !window.LiteGraph.registered_node_types[n.type],
            error: !!n.has_errors,
        }));
    }""")


def run_loaded(page, url: str, timeout_s: float = 600) -> dict:
    """Queue the loaded graph as Run does and wait until the server is done with it: its history entry, with
    the frontend's node errors (None when it accepted every node)."""
    before = set(get_json(f"{url}/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1) }")
    page.wait_for_timeout(300)
    errors = page.evaluate("() => window.app.lastNodeErrors ?? null")
    if errors:
        return {"node_errors": errors, "status": None}
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        new = {k: v for k, v in get_json(f"{url}/history").items() if k not in before}
        done = [v for v in new.values() if v.get("status", {}).get("completed") or v.get("status", {}).get("status_str") == "error"]
        if done:
            return {"node_errors": None, **done[0]}
        time.sleep(1)
    raise TimeoutError(f"the queued template did not finish in {timeout_s} s")


def close_dialogs(page) -> None:
    """Close what the frontend opens over the canvas (the template browser of a first start, the missing-models
    notice of a template whose checkpoint is not downloaded yet)."""
    for _ in range(6):
        if page.locator(".p-dialog-mask").count() == 0:
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def fit_view(page) -> None:
    """Zoom the canvas so the whole graph is in view (the frontend's own Fit View command)."""
    page.evaluate("""async () => {
        const cmd = window.app.extensionManager?.command;
        if (cmd) await cmd.execute('Comfy.Canvas.FitView');
    }""")
    page.wait_for_timeout(500)


def graph_clip(page, margin: int = 20) -> dict:
    """The screen rectangle the graph's nodes occupy (for a screenshot of the graph alone)."""
    return page.evaluate("""(margin) => {
        const c = window.app.canvas, ds = c.ds, g = window.app.graph, title = window.LiteGraph.NODE_TITLE_HEIGHT;
        const box = c.canvas.getBoundingClientRect();
        const xs = [], ys = [];
        for (const n of (g.nodes ?? g._nodes)) {
            xs.push(n.pos[0], n.pos[0] + n.size[0]);
            ys.push(n.pos[1] - title, n.pos[1] + n.size[1]);
        }
        const sx = v => box.left + (v + ds.offset[0]) * ds.scale, sy = v => box.top + (v + ds.offset[1]) * ds.scale;
        const x = Math.max(0, sx(Math.min(...xs)) - margin), y = Math.max(0, sy(Math.min(...ys)) - margin);
        return {x, y, width: sx(Math.max(...xs)) + margin - x, height: sy(Math.max(...ys)) + margin - y};
    }""", margin)
