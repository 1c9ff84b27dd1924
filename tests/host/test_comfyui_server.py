"""ComfyUI itself starts with the pack in custom_nodes and serves its nodes and workflows."""
import sys
from pathlib import Path

from comfy_host import COMFYUI_PATH, REPO

sys.path.insert(0, str(REPO / "scripts"))
from comfy_frontend import comfy_server, get_json  # noqa: E402

PACK_NODES = {"MorseLoadDotModel", "MorseDashDotSchedule", "MorseKSampler", "MorseModelPatch"}


def test_comfyui_starts_with_the_pack_and_lists_its_nodes_and_workflows(host, tmp_path):
    base = tmp_path / "comfy_base"
    with comfy_server(Path(COMFYUI_PATH), base) as url:
        info = get_json(f"{url}/object_info")
        assert PACK_NODES <= set(info), "the pack's nodes are not listed"
        assert info["MorseKSampler"]["display_name"] == "Morse KSampler"
        templates = get_json(f"{url}/workflow_templates")
        assert set(templates.get("comfyui-morse", [])) == {p.stem for p in (REPO / "example_workflows").glob("*.json")}
    text = (base / "comfyui.log").read_text()
    failed = [line for line in text.splitlines() if "comfyui-morse" in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failed, failed


def test_pyproject_is_valid_for_the_comfy_registry(host):
    """ComfyUI's own parser of Registry metadata reads our pyproject.toml."""
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "comfyui-morse"
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name
    assert not [d for d in config.project.dependencies if d.lower().startswith("torch")]
