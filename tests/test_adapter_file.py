import json

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import TinyBackbone
from morse_engine import (
    PaperDotConfig,
    DotFileError,
    DotMismatchError,
    PaperDot,
    fingerprint_module,
    load_dot,
    read_dot_info,
    save_dot,
)


@pytest.fixture
def saved(tmp_path, backbone):
    torch.manual_seed(2)
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=2, lora_rank=4, lora_alpha=4.0))
    with torch.no_grad():
        for p in dot.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_dot(
        tmp_path / "tiny.safetensors",
        dot,
        base_family="tiny-test",
        fingerprint=fingerprint_module(backbone),
        measured_n=6.5,
        training={"steps": 3, "final_loss": 0.1},
    )
    return path, dot


def test_round_trip_keeps_weights_config_and_metadata(saved, backbone):
    path, dot = saved
    loaded, info = load_dot(path, backbone)
    assert info.config == dot.config
    assert info.base_family == "tiny-test"
    assert info.measured_n == pytest.approx(6.5)
    assert info.training == {"steps": 3, "final_loss": 0.1}
    for (k, a), (k2, b) in zip(dot.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(1, 4, 8, 8)
    t = torch.ones(1) * 100
    dot.eval().requires_grad_(False)  # as loaded: on some CPUs kernels differ in the last bit for trainable weights
    with torch.no_grad():
        assert torch.equal(dot(backbone, x, t, x, x, t + 1), loaded(backbone, x, t, x, x, t + 1))
    assert "Dot for tiny-test" in info.describe()


def test_metadata_records_what_the_design_asks_for(saved):
    path, _ = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "morse-dot" and meta["format_version"] == "3"
    cfg = json.loads(meta["config"])
    assert cfg["layout"] == "paper"
    for field in ("m", "widths", "lora_rank", "lora_alpha", "lora_targets", "latent_channels", "trajectory"):
        assert field in cfg
    assert meta["base_family"] and meta["dash_architecture"] and json.loads(meta["dash_weights_probe"])
    assert float(meta["measured_n"]) == 6.5 and json.loads(meta["training"])
    assert not any(k.startswith(("conv_in", "attn1", "time_embed")) for k in keys), "backbone weights must not be saved"


def backbone_unchanged(backbone, before):
    after = backbone.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_truncated_file_is_refused_and_nothing_is_loaded(saved, backbone, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(DotFileError, match="truncated.safetensors.*(truncated or corrupt)"):
        load_dot(bad, backbone)
    header_cut = tmp_path / "cut.safetensors"
    header_cut.write_bytes(data[:20])
    with pytest.raises(DotFileError, match="cut.safetensors"):
        load_dot(header_cut, backbone)
    assert backbone_unchanged(backbone, before)
    assert all(not m._forward_hooks for m in backbone.modules())


def test_safetensors_without_morse_metadata_is_refused(tmp_path, backbone):
    path = tmp_path / "some_lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"ss_network_module": "networks.lora"})
    with pytest.raises(DotFileError, match="some_lora.safetensors' has no Morse Dot metadata"):
        load_dot(path, backbone)


def test_non_safetensors_and_missing_files_are_refused(tmp_path, backbone):
    pickle_like = tmp_path / "dot.ckpt"
    pickle_like.write_bytes(b"\x80\x04not really")
    with pytest.raises(DotFileError, match="not a .safetensors file"):
        load_dot(pickle_like, backbone)
    with pytest.raises(DotFileError, match="does not exist"):
        load_dot(tmp_path / "absent.safetensors", backbone)
    with pytest.raises(DotFileError, match="ending in .safetensors"):
        save_dot(tmp_path / "x.pt", None, base_family="f", fingerprint=fingerprint_module(backbone))


def test_file_for_another_architecture_is_refused(saved):
    path, _ = saved
    other = TinyBackbone(model_channels=24)
    with pytest.raises(DotMismatchError, match="different model architecture"):
        load_dot(path, other)


def test_file_for_other_weights_is_refused_unless_allowed(saved):
    path, _ = saved
    retrained = TinyBackbone(seed=123)
    with pytest.raises(DotMismatchError, match="other weights of this architecture"):
        load_dot(path, retrained)
    dot, _ = load_dot(path, retrained, allow_other_weights=True)
    assert isinstance(dot, PaperDot)


def test_same_weights_in_half_precision_match(saved, backbone):
    path, _ = saved
    half = TinyBackbone().to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in backbone.state_dict().items()})
    info = read_dot_info(path)
    assert fingerprint_module(half).weights_match(info.fingerprint)


def test_file_whose_tensors_do_not_match_its_metadata_is_refused(saved, backbone, tmp_path):
    path, _ = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop(next(iter(tensors)))
    bad = tmp_path / "missing_tensor.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(DotFileError, match="1 missing"):
        load_dot(bad, backbone)


def test_dot_adapter_reads_once_and_builds_per_backbone(saved, backbone):
    from morse_engine import DotFile

    path, dot = saved
    adapter = DotFile(path)
    assert adapter.measured_n == pytest.approx(6.5)
    first = adapter.dot_for(backbone)
    assert adapter.dot_for(backbone) is first
    assert torch.equal(first.out.weight, dot.out.weight)
    with pytest.raises(DotMismatchError):
        adapter.dot_for(TinyBackbone(model_channels=24))


def _rewrite_meta(path, out, **changes):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_a_version_1_file_without_the_layout_fields_migrates_to_the_papers_layout(saved, backbone, tmp_path):
    path, dot = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    for layout_field in ("step_input", "prediction", "stem", "eta_scale", "base"):
        cfg.pop(layout_field)
    old = _rewrite_meta(path, tmp_path / "old.safetensors", format_version="1", config=json.dumps(cfg))
    loaded, info = load_dot(old, backbone)
    assert (info.config.step_input, info.config.stem, info.config.eta_scale, info.config.base) == \
        ("x_s", "full_res", "none", "anchor")
    assert info.config == dot.config  # the fixture's Dot has the paper's layout


def test_a_version_2_file_without_a_layout_key_is_the_papers_dot(saved, backbone, tmp_path):
    path, dot = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    cfg.pop("layout")
    loaded, info = load_dot(_rewrite_meta(path, tmp_path / "v2.safetensors", format_version="2", config=json.dumps(cfg)),
                            backbone)
    assert info.config == dot.config and type(loaded) is type(dot)


def test_a_file_with_an_unknown_layout_is_refused_as_damaged(saved, backbone, tmp_path):
    path, _ = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    cfg["layout"] = "transformer"
    with pytest.raises(DotFileError, match="damaged Morse metadata"):
        load_dot(_rewrite_meta(path, tmp_path / "odd.safetensors", config=json.dumps(cfg)), backbone)


def test_a_file_from_a_newer_pack_is_refused_with_update_it(saved, backbone, tmp_path):
    path, _ = saved
    newer = _rewrite_meta(path, tmp_path / "newer.safetensors", format_version="4")
    with pytest.raises(DotFileError, match="made by a newer version of the pack; update it"):
        load_dot(newer, backbone)


def test_a_file_from_before_the_weight_sample_loads_on_the_older_check_and_says_it_is_weak(saved, backbone):
    path, _ = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert not read_dot_info(path).fingerprint.weak
    old = {k: v for k, v in meta.items() if not k.startswith("dash_weights_sample")}
    save_file(tensors, str(path), metadata=old)
    info = read_dot_info(path)
    assert info.fingerprint.weak
    load_dot(path, backbone)  # same weights: accepted on the mean probe
    with pytest.raises(DotMismatchError, match="other weights"):
        load_dot(path, TinyBackbone(seed=123))


# --------------------------------------------------------------------------- measured pattern table
def _header_and_data(path):
    """The safetensors header (tensor entries and metadata) and the raw tensor bytes after it."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return header.pop("__metadata__", {}), header, raw[8 + n:]


def test_a_file_without_a_pattern_table_loads_as_before(saved, backbone):
    path, _ = saved
    assert "pattern_table" not in _header_and_data(path)[0]
    assert read_dot_info(path).pattern_table is None
    from morse_engine import DotFile

    assert DotFile(path).pattern_table is None


def test_writing_a_pattern_table_changes_only_that_metadata_entry(saved, backbone):
    from morse_engine import DotFile, write_pattern_table

    path, dot = saved
    meta, entries, data = _header_and_data(path)
    write_pattern_table(path, {"euler": [[8, "D."], [4, "D..."]], "dpmpp_2m": [[6, "D.."]]})
    meta2, entries2, data2 = _header_and_data(path)
    assert data2 == data and entries2 == entries  # the tensors, byte for byte, at the same offsets
    assert {k: v for k, v in meta2.items() if k != "pattern_table"} == meta
    expected = {"euler": ((4.0, "D..."), (8.0, "D.")), "dpmpp_2m": ((6.0, "D.."),)}
    assert read_dot_info(path).pattern_table == expected and DotFile(path).pattern_table == expected
    loaded, _ = load_dot(path, backbone)
    for (k, a), (k2, b) in zip(dot.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    write_pattern_table(path, None)  # removed again: the file is as it was
    assert _header_and_data(path) == (meta, entries, data)


def test_save_dot_can_write_the_table_too(tmp_path, backbone):
    dot = PaperDot.build(backbone, PaperDotConfig.for_backbone(backbone, m=2, lora_rank=4, lora_alpha=4.0))
    path = save_dot(tmp_path / "t.safetensors", dot, base_family="tiny-test", fingerprint=fingerprint_module(backbone),
                    pattern_table={"euler": [[4, "D.."]]})
    assert read_dot_info(path).pattern_table == {"euler": ((4.0, "D.."),)}


@pytest.mark.parametrize("text", ['{"euler": [[4, "D.x"]]}', '{"euler": [[0, "D."]]}', "not json", '[1, 2]'])
def test_a_bad_pattern_table_in_a_file_is_refused_naming_the_entry_and_the_fix(saved, tmp_path, text):
    path, _ = saved
    bad = _rewrite_meta(path, tmp_path / "bad.safetensors", pattern_table=text)
    with pytest.raises(DotFileError) as err:
        read_dot_info(bad)
    message = str(err.value)
    assert "'pattern_table'" in message and "python -m training.pattern_table" in message and "bad.safetensors" in message


def test_a_bad_table_or_a_foreign_file_is_refused_and_nothing_is_written(saved, tmp_path):
    from morse_engine import write_pattern_table

    path, _ = saved
    before = path.read_bytes()
    with pytest.raises(DotFileError, match="cannot be written.*'D' followed by dots"):
        write_pattern_table(path, {"euler": [[4, ".D"]]})
    assert path.read_bytes() == before
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(DotFileError, match="no Morse Dot metadata"):
        write_pattern_table(foreign, {"euler": [[4, "D."]]})
    assert "pattern_table" not in _header_and_data(foreign)[0]
