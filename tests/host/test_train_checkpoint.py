"""``python -m training.train_dot --checkpoint`` on checkpoints ComfyUI loads, end to end.

Tiny SD1.x (eps), SD2.x (v-prediction) and SDXL-family checkpoints are written to disk with
ComfyUI's saver; train_dot trains a few steps on each from prompts (data-free) and from
captioned images; the adapter is loaded by Load Dot Model and used by Morse KSampler on the
checkpoint as ComfyUI loads it (CLIPTextEncode conditioning, SDXL's y included).
"""
import json

import pytest
import torch

from comfy_host import COMFYUI_PATH
from tiny_checkpoints import tiny_families_registered, tiny_umt5_loadable, write_tiny_checkpoint, write_tiny_wan_files

RESOLUTION = 64  # 8x8 latents: seconds per run on one CPU thread
FAMILIES = [("sd15", False, "eps"), ("sd20v", True, "v"), ("sdxl", False, "eps")]


@pytest.fixture
def families(host):
    with tiny_families_registered(host) as registered:
        yield registered


def write_prompts(folder):
    path = folder / "prompts.txt"
    path.write_text("a red cube on a table\n# a comment line\n\na watercolour fox\na city at night, rain\n")
    return path


def write_images(folder, n=3):
    from PIL import Image

    images = folder / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(5)
    for i in range(n):
        pixels = (torch.rand(80, 72 + 8 * i, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"img{i}.png")
        if i:  # the first image has no caption: it trains with the empty prompt
            (images / f"img{i}.txt").write_text(f"a photo number {i}")
    return images


LAYOUT_FLAGS = {
    "paper": ["--layout", "paper", "--batch-size", "2", "--m", "1", "--lora-rank", "2"],
    "feature": ["--layout", "feature", "--rollout-runs", "2", "--rollout-batch", "1", "--rollout-steps", "2,4",
                "--change-width", "8"],
}


def train(tmp_path, checkpoint, name, source, out_dir, layout="paper"):
    from training import train_dot

    argv = [
        "--checkpoint", str(checkpoint), *source, "--comfyui", COMFYUI_PATH, "--name", name,
        "--runs", str(tmp_path / "runs"), "--out", str(out_dir / f"{name}.safetensors"), *LAYOUT_FLAGS[layout],
        "--steps", "2", "--resolution", str(RESOLUTION), "--trajectory-steps", "2,3", "--n-batch", "2", "--threads", "1",
        "--checkpoint-every", "1000",
    ]
    assert train_dot.main(argv) == 0
    return f"{name}.safetensors"


def node(host, name):
    return host.nodes.NODE_CLASS_MAPPINGS[name]


def sample_with_dot(host, checkpoint, dot_name):
    """Load Dot Model + Morse KSampler on the checkpoint as ComfyUI loads it; the backbone input sizes seen."""
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    encode = host.nodes.CLIPTextEncode()
    positive, negative = encode.encode(clip, "a red cube")[0], encode.encode(clip, "")[0]
    dot = node(host, "MorseLoadDotModel").execute(dot_name).result[0]
    sizes = []
    conv = model.model.diffusion_model.input_blocks[0][0]
    handle = conv.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[-1]))
    try:
        out = node(host, "MorseKSampler").execute(
            model, 7, 4, 3.0, "euler", "normal", positive, negative, {"samples": torch.zeros(1, 4, 8, 8)}, 1.0,
            dot=dot, schedule=host.engine.Pattern("D."),
        ).result[0]["samples"]
    finally:
        handle.remove()
    return out, sizes


@pytest.mark.parametrize("family,v_prediction,prediction", FAMILIES)
@pytest.mark.parametrize("layout", ["paper", "feature"])
def test_train_dot_on_a_checkpoint_from_prompts_and_images_then_sample_with_it(
    host, families, dot_folder, tmp_path, family, v_prediction, prediction, layout
):
    checkpoint = write_tiny_checkpoint(host, families, family, tmp_path / f"tiny_{family}.safetensors", v_prediction=v_prediction)
    import comfy.sd

    loaded = comfy.sd.load_checkpoint_guess_config(str(checkpoint))[0].model
    assert loaded.model_type.name == ("V_PREDICTION" if v_prediction else "EPS")

    for source_name, source in (
        ("prompts", ["--prompts", str(write_prompts(tmp_path))]),
        ("images", ["--images", str(write_images(tmp_path))]),
    ):
        dot_name = train(tmp_path, checkpoint, f"{family}_{source_name}_{layout}", source, dot_folder, layout)
        info = host.engine.read_dot_info(dot_folder / dot_name)
        assert info.config.prediction == prediction
        assert info.base_family == type(loaded.model_config).__name__
        assert info.config.latent_channels == 4
        assert info.measured_n and info.measured_n > 0
        assert json.loads(json.dumps(info.training))["data"].startswith(source_name)
        out, sizes = sample_with_dot(host, checkpoint, dot_name)
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        if layout == "paper":
            # Dash steps see the 8x8 latent; Dot steps run the backbone at 1/2 per side (m = 1)
            assert info.config.m == 1 and 8 in sizes and 4 in sizes, sizes
        else:
            # 4 steps of D.: 2 Dash calls and 2 fills, each running the checkpoint's first block at full size
            assert isinstance(info.config, host.engine.FeatureDotConfig) and sizes == [8] * 4, sizes


def test_a_second_run_reads_latents_and_text_embeddings_from_the_cache(host, families, dot_folder, tmp_path, capsys, monkeypatch):
    import comfy.sd

    checkpoint = write_tiny_checkpoint(host, families, "sd15", tmp_path / "tiny_sd15.safetensors")
    source = ["--images", str(write_images(tmp_path))]
    train(tmp_path, checkpoint, "cached", source, dot_folder)
    # before training: encoded; the reload after training (for measuring N) already reads the cache
    first = capsys.readouterr().out.split("Training a Dot")[0]
    assert "cache: encoded" in first and "cache hit" not in first
    cache_files = sorted((tmp_path / "runs" / "cached" / "cache").rglob("*.safetensors"))
    assert len(cache_files) == 2  # text embeddings and image latents
    stamps = [p.stat().st_mtime_ns for p in cache_files]

    def must_not_encode(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds the result")

    monkeypatch.setattr(comfy.sd.VAE, "encode", must_not_encode)
    monkeypatch.setattr(comfy.sd.CLIP, "encode_from_tokens_scheduled", must_not_encode)
    train(tmp_path, checkpoint, "cached", source, dot_folder)
    second = capsys.readouterr().out
    assert second.count("cache hit") >= 2 and "cache: encoded" not in second
    assert [p.stat().st_mtime_ns for p in cache_files] == stamps


def test_a_checkpoint_without_a_data_source_or_comfyui_gets_a_clear_error(host, families, tmp_path, capsys, monkeypatch):
    from training import train_dot

    checkpoint = write_tiny_checkpoint(host, families, "sd15", tmp_path / "tiny_sd15.safetensors")
    assert train_dot.main(["--checkpoint", str(checkpoint), "--comfyui", COMFYUI_PATH, "--runs", str(tmp_path)]) == 2
    assert "--prompts FILE" in capsys.readouterr().err
    assert train_dot.main(["--checkpoint", str(checkpoint), "--comfyui", str(tmp_path), "--prompts", "p.txt",
                           "--runs", str(tmp_path)]) == 2
    assert "has no comfy/ package" in capsys.readouterr().err


@pytest.mark.parametrize("family,v_prediction", [("sd20v", True), ("sdxl", False)])
def test_the_training_jump_is_comfyuis_cfg_euler_step_in_the_models_own_prediction(host, families, tmp_path, family, v_prediction):
    """x_s -> x_i in training is what ComfyUI's euler step with CFG does (v turned into eps; SDXL's y passed)."""
    import comfy.sd

    from training.host.comfy_setup import comfy_setup
    from training.trainer.config import DotTrainConfig
    from training.trainer.loop import training_tuple

    checkpoint = write_tiny_checkpoint(host, families, family, tmp_path / "tiny.safetensors", v_prediction=v_prediction)
    setup = comfy_setup(checkpoint, tmp_path / "run", prompts=write_prompts(tmp_path), resolution=RESOLUTION,
                        comfyui=COMFYUI_PATH, log=lambda *a: None)
    assert setup.prediction == ("v" if v_prediction else "eps")
    assert (setup.extra_kwargs is not None) == (family == "sdxl")  # SD1.x/SD2.x take the context alone
    if family == "sdxl":
        assert setup.extra_kwargs(setup.null_condition(1))["y"].shape == (1, 32 + 6 * 256)
    gen = torch.Generator().manual_seed(3)
    cfg = DotTrainConfig.of(cfg_min=3.0, cfg_max=3.0)
    x0, cond = next(setup.batches(2, gen))
    with torch.no_grad():
        batch = training_tuple(setup, x0, cond, cfg, gen)

    model = comfy.sd.load_checkpoint_guess_config(str(checkpoint))[0].model
    b = 2
    sig_s, sig_i = batch.anchor_sigma[:b], batch.sigma[:b]
    view = (b, 1, 1, 1)
    x_s = batch.anchor_x[:b] * (sig_s.view(view) ** 2 + 1) ** 0.5  # back from the backbone's scaled input
    x_i = batch.x[:b] * (sig_i.view(view) ** 2 + 1) ** 0.5
    with torch.no_grad():
        denoised = model.apply_model(torch.cat([x_s, x_s]), torch.cat([sig_s, sig_s]), c_crossattn=batch.context,
                                     **batch.backbone_kwargs)
    c, u = denoised.chunk(2)
    guided = u + 3.0 * (c - u)  # ComfyUI's cfg_function
    expected = x_s + (x_s - guided) / sig_s.view(view) * (sig_i - sig_s).view(view)  # k-diffusion's euler step
    torch.testing.assert_close(x_i, expected, rtol=1e-4, atol=1e-4)


def test_data_free_anchors_are_where_comfyuis_ksampler_gets_to(host, families, tmp_path):
    """The data-free source stops ComfyUI's own sampling (euler, normal, CFG) at a random step: the same latent
    as KSampler with last_step at that step."""
    import comfy.sample
    import comfy.sd

    from training.host.comfy_setup import comfy_setup, read_prompts

    checkpoint = write_tiny_checkpoint(host, families, "sdxl", tmp_path / "tiny.safetensors")
    prompts = write_prompts(tmp_path)
    setup = comfy_setup(checkpoint, tmp_path / "run", prompts=prompts, resolution=RESOLUTION, comfyui=COMFYUI_PATH,
                        log=lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    batches = setup.batches(1, gen)
    while True:  # a run that takes at least one step
        noise, cond = next(batches)
        with torch.no_grad():
            x_s, sigma_s = setup.trajectory(noise, cond, gen)
        if setup.trajectory.last["stop"] > 0:
            break
    drawn = setup.trajectory.last

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    encode = host.nodes.CLIPTextEncode()
    positive = encode.encode(clip, read_prompts(prompts)[int(cond)])[0]
    negative = encode.encode(clip, "")[0]
    out = comfy.sample.sample(model, noise, drawn["steps"], drawn["cfg"], "euler", "normal", positive, negative,
                              torch.zeros_like(noise), last_step=drawn["stop"], force_full_denoise=False, disable_pbar=True)
    # KSampler returns the latent in the VAE's space; the run stays in the model's (scale factor)
    torch.testing.assert_close(x_s, model.model.latent_format.process_in(out), rtol=1e-4, atol=1e-4)
    sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "normal", drawn["steps"])
    assert float(sigma_s[0]) == pytest.approx(float(sigmas[drawn["stop"]]))


def test_a_file_comfyui_cannot_load_is_refused_by_name(host, tmp_path, capsys):
    from training import train_dot

    prompts = write_prompts(tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    assert train_dot.main(["--checkpoint", str(broken), "--prompts", str(prompts), "--comfyui", COMFYUI_PATH,
                           "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "ComfyUI cannot load --checkpoint" in err and "broken.safetensors" in err


def test_an_inpainting_checkpoint_is_refused_with_nothing_written(host, families, tmp_path, capsys):
    from training import train_dot

    checkpoint = write_tiny_checkpoint(host, families, "sd15", tmp_path / "tiny_inpaint.safetensors", in_channels=9)
    runs = tmp_path / "runs"
    assert train_dot.main(["--checkpoint", str(checkpoint), "--prompts", str(write_prompts(tmp_path)),
                           "--comfyui", COMFYUI_PATH, "--runs", str(runs), "--out", str(tmp_path / "dot.safetensors")]) == 2
    assert "inpainting" in capsys.readouterr().err
    assert not runs.exists() and not (tmp_path / "dot.safetensors").exists()


def test_train_dot_on_a_flux_checkpoint_then_sample_with_it(host, families, dot_folder, tmp_path, capsys, caplog):
    """A flow DiT checkpoint (Flux, guidance-distilled): train_dot trains the DiT feature Dot from prompts on
    ComfyUI's own Flux class, its runs at CFG 1 as Flux is sampled; Load Dot Model + Morse KSampler then serve the
    fill steps with it on the checkpoint as ComfyUI loads it (CLIPTextEncode's T5 + pooled CLIP, Flux's guidance)."""
    import logging

    import comfy.sd

    checkpoint = write_tiny_checkpoint(host, families, "flux", tmp_path / "tiny_flux.safetensors")
    dot_name = train(tmp_path, checkpoint, "flux_prompts", ["--prompts", str(write_prompts(tmp_path))], dot_folder,
                     layout="feature")
    assert "sampled at CFG 1" in capsys.readouterr().out
    info = host.engine.read_dot_info(dot_folder / dot_name)
    assert (info.config.backbone, info.config.prediction, info.base_family) == ("dit", "flow", "TinyFlux")
    assert info.config.time_scale == 1000.0  # ModelSamplingFlux's timestep is sigma itself
    assert info.config.deep_channels == 64  # the tiny Flux's hidden width
    assert (info.training["config"]["cfg_min"], info.training["config"]["cfg_max"]) == (1.0, 1.0)
    assert info.measured_n and info.measured_n > 0

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    positive = host.nodes.CLIPTextEncode().encode(clip, "a red cube")[0]
    dot = node(host, "MorseLoadDotModel").execute(dot_name).result[0]
    with caplog.at_level(logging.INFO, logger="morse"):
        out = node(host, "MorseKSampler").execute(
            model, 7, 4, 1.0, "euler", "simple", positive, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 1.0,
            dot=dot, schedule=host.engine.Pattern("D."),
        ).result[0]["samples"]
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ")]
    assert any("2 Dash steps, 2 dot steps of 4" in line for line in lines), lines


def test_the_papers_layout_on_a_flow_checkpoint_is_refused_in_one_sentence(host, families, tmp_path, capsys):
    from training import train_dot

    checkpoint = write_tiny_checkpoint(host, families, "flux", tmp_path / "tiny_flux.safetensors")
    argv = ["--checkpoint", str(checkpoint), "--prompts", str(write_prompts(tmp_path)), "--comfyui", COMFYUI_PATH,
            "--runs", str(tmp_path / "runs"), "--layout", "paper", "--resolution", str(RESOLUTION), "--steps", "1"]
    assert train_dot.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--layout feature" in err and err.count("\n") == 1, err


def test_train_dot_on_a_wan_checkpoint_then_sample_a_video_with_it(host, families, dot_folder, tmp_path, caplog):
    """A video flow DiT (Wan 2.1 t2v, UMT5 text encoder): the Dot trains on 5-frame clips (2 latent frames) at CFG
    from the prompts and the empty prompt, then serves Morse KSampler's fill steps on a Wan video latent."""
    import logging

    import comfy.sd

    checkpoint = write_tiny_checkpoint(host, families, "wan21", tmp_path / "tiny_wan.safetensors")
    dot_name = train(tmp_path, checkpoint, "wan_prompts", ["--prompts", str(write_prompts(tmp_path)), "--frames", "5"],
                     dot_folder, layout="feature")
    info = host.engine.read_dot_info(dot_folder / dot_name)
    assert (info.config.backbone, info.config.prediction, info.base_family) == ("dit", "flow", "TinyWan21")
    assert info.config.time_scale == 1.0  # ModelSamplingDiscreteFlow's timestep is sigma x 1000 already
    assert info.training["config"]["cfg_min"] > 1.0  # Wan samples with CFG

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    encode = host.nodes.CLIPTextEncode()
    positive, negative = encode.encode(clip, "a red cube")[0], encode.encode(clip, "")[0]
    dot = node(host, "MorseLoadDotModel").execute(dot_name).result[0]
    with caplog.at_level(logging.INFO, logger="morse"):
        out = node(host, "MorseKSampler").execute(
            model, 7, 4, 5.0, "euler", "simple", positive, negative, {"samples": torch.zeros(1, 16, 2, 8, 8)}, 1.0,
            dot=dot, schedule=host.engine.Pattern("D."),
        ).result[0]["samples"]
    assert out.shape == (1, 16, 2, 8, 8) and torch.isfinite(out).all()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ")]
    assert any("2 Dash steps, 2 dot steps of 4" in line for line in lines), lines


def test_train_dot_on_a_diffusion_model_with_its_text_encoder_file_as_wan_users_have_them(host, families, dot_folder,
                                                                                          tmp_path, capsys):
    """Wan as its users have it: the diffusion model (UNETLoader's file) with --text-encoder (CLIPLoader's; the type
    the family's, "wan"); the Dot's fingerprint is the diffusion model's, so it loads on that file."""
    import comfy.sd

    files = [tmp_path / f"{n}.safetensors" for n in ("wan_unet", "umt5", "wan_vae")]
    with tiny_umt5_loadable():
        write_tiny_wan_files(host, families, *files)
        dot_name = train(tmp_path, files[0], "wan_split", ["--text-encoder", str(files[1]), "--prompts",
                                                           str(write_prompts(tmp_path)), "--frames", "5"],
                         dot_folder, layout="feature")
        model = comfy.sd.load_diffusion_model(str(files[0]))
        clip = comfy.sd.load_clip([str(files[1])], clip_type=comfy.sd.CLIPType.WAN)
    info = host.engine.read_dot_info(dot_folder / dot_name)
    assert (info.config.backbone, info.base_family) == ("dit", "TinyWan21")
    assert info.fingerprint == host.engine.fingerprint_module(model.model.diffusion_model)
    encode = host.nodes.CLIPTextEncode()
    positive, negative = encode.encode(clip, "a red cube")[0], encode.encode(clip, "")[0]
    dot = node(host, "MorseLoadDotModel").execute(dot_name).result[0]
    out = node(host, "MorseKSampler").execute(
        model, 7, 4, 5.0, "euler", "simple", positive, negative, {"samples": torch.zeros(1, 16, 2, 8, 8)}, 1.0,
        dot=dot, schedule=host.engine.Pattern("D."),
    ).result[0]["samples"]
    assert torch.isfinite(out).all()


def test_a_text_encoder_type_the_model_cannot_take_is_refused_by_name(host, families, tmp_path, capsys):
    from training import train_dot

    files = [tmp_path / f"{n}.safetensors" for n in ("wan_unet", "umt5", "wan_vae")]
    with tiny_umt5_loadable():
        write_tiny_wan_files(host, families, *files)
    base = ["--checkpoint", str(files[0]), "--prompts", str(write_prompts(tmp_path)), "--comfyui", COMFYUI_PATH,
            "--runs", str(tmp_path / "runs"), "--resolution", str(RESOLUTION), "--steps", "1"]
    assert train_dot.main(base + ["--text-encoder", str(files[1]), "--clip-type", "no_such_type"]) == 2
    assert "--clip-type 'no_such_type'" in capsys.readouterr().err
    assert train_dot.main(base + ["--text-encoder", str(tmp_path / "missing.safetensors")]) == 2
    assert "--text-encoder" in capsys.readouterr().err
