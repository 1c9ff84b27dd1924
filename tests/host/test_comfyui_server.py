"""ComfyUI itself starts with the pack in custom_nodes and serves its nodes and workflows."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from comfy_host import COMFYUI_PATH, REPO

PACK_NODES = {"MorseLoadDotModel", "MorseDashDotSchedule", "MorseKSampler", "MorseModelPatch"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_comfyui_starts_with_the_pack_and_lists_its_nodes_and_workflows(host, tmp_path):
    base = tmp_path / "comfy_base"
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(REPO, base / "custom_nodes" / "comfyui-morse")
    port = free_port()
    log = open(tmp_path / "comfyui.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch"],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 120
        info = None
        while time.time() < deadline and proc.poll() is None:
            try:
                info = get_json(f"http://127.0.0.1:{port}/object_info")
                break
            except OSError:
                time.sleep(1)
        assert info is not None, (tmp_path / "comfyui.log").read_text()[-3000:]
        assert PACK_NODES <= set(info), "the pack's nodes are not listed"
        assert info["MorseKSampler"]["display_name"] == "Morse KSampler"
        templates = get_json(f"http://127.0.0.1:{port}/workflow_templates")
        assert set(templates.get("comfyui-morse", [])) == {p.stem for p in (REPO / "example_workflows").glob("*.json")}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = (tmp_path / "comfyui.log").read_text()
    failed = [line for line in text.splitlines() if "comfyui-morse" in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failed, failed


def test_pyproject_is_valid_for_the_comfy_registry(host):
    """ComfyUI's own parser of Registry metadata reads our pyproject.toml."""
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "comfyui-morse"
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name
    assert not [d for d in config.project.dependencies if d.lower().startswith("torch")]
