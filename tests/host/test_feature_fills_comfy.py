"""The feature fills on ComfyUI's own UNetModel: exact at the anchor, and bypassed where patches change the skips."""
import importlib
import re

import torch


def _modules(host):
    ff = importlib.import_module(host.engine.__name__ + ".feature_fills")
    fillers = importlib.import_module(host.engine.__name__ + ".fillers")
    blocks = importlib.import_module(host.pack.__name__ + ".nodes.unet_blocks")
    return ff, fillers, blocks


def test_every_feature_fill_reproduces_comfyuis_unet_at_the_anchor(host, tiny):
    ff, fillers, blocks_mod = _modules(host)
    unet = tiny.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.full((2,), 500.0), torch.randn(2, 77, 32, generator=g)
    blocks = blocks_mod.ComfyUNetBlocks(unet)
    n = len(unet.input_blocks)
    fills = [ff.FeatureInheritFiller(blocks, k) for k in range(1, n + 1)] + [ff.EncoderPropagationFiller(blocks)]
    for fill in fills:
        with torch.no_grad(), ff.captured(fill.capture_modules()) as feats:
            z = unet(x, t, context=context, transformer_options={})
        anchor = fillers.Anchor(x=x, z=z, t=t, step=0, features=dict(feats))
        with torch.no_grad():
            out = fill(unet, x, t, anchor, context, {"transformer_options": {}})
        assert torch.equal(out, z), fill.name
        later = fill(unet, x * 0.9, t - 40, anchor, context, {"transformer_options": {}})
        assert later.shape == z.shape and not torch.equal(later, z)


def test_patches_that_change_the_skips_and_control_inputs_fall_back(host, tiny):
    ff, _, blocks_mod = _modules(host)
    fill = ff.FeatureInheritFiller(blocks_mod.ComfyUNetBlocks(tiny.model.diffusion_model), 1)
    assert fill.accepts({"transformer_options": {"patches": {"output_block_patch": [lambda h, s, o: (h, s)]}}})
    assert not fill.accepts({"transformer_options": {"patches": {"input_block_patch": [lambda h, o: h]}}})
    assert not fill.accepts({"control": {"input": [None]}, "transformer_options": {}})


def test_morse_ksampler_samples_with_each_feature_fill_and_logs_its_measured_n(host, tiny, caplog):
    import logging

    from test_morse_ksampler import ksampler, morse

    plain = ksampler(host, tiny, steps=6)
    reuse = morse(host, tiny, steps=6, schedule=host.engine.Pattern("D."), fill_without_dot="reuse")
    for name in ("inherit_k1", "inherit_k2", "forecast_k1", "forecast_k2", "forecast2_k2", "propagate"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="morse"):
            out = morse(host, tiny, steps=6, schedule=host.engine.Pattern("D."), fill_without_dot=name)
        assert out.shape == plain.shape and torch.isfinite(out).all()
        assert not torch.equal(out, plain) and not torch.equal(out, reuse)
        if name.startswith("forecast"):  # the deep feature moves from the second fill on
            inherited = morse(host, tiny, steps=6, schedule=host.engine.Pattern("D."),
                              fill_without_dot=re.sub(r"forecast\d?", "inherit", name))
            assert not torch.equal(out, inherited)
        if name == "forecast2_k2":  # the third fill follows three Dash steps: the parabola, not the line
            line_out = morse(host, tiny, steps=6, schedule=host.engine.Pattern("D."), fill_without_dot="forecast_k2")
            assert not torch.equal(out, line_out)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse:"))
        assert f"3 Dash steps, 3 {name} steps of 6" in line and "N " in line and "measured" in line


def test_the_fills_serve_sdxl_and_sd2_v_unets_and_decode_a_span_in_one_call(host):
    """SDXL's label embedding (the y vector) and SD2's linear transformers go through the fills' block calls:
    exact at the anchor, and a span decoded in one batched call equals decoding each time on its own."""
    from tiny_checkpoints import _randomise, tiny_families

    ff, fillers, blocks_mod = _modules(host)
    for family in ("sdxl", "sd20v"):
        cls, unet_config = tiny_families(host)[family]
        model = cls(dict(unet_config)).get_model({}, device=torch.device("cpu"))
        unet = model.diffusion_model
        _randomise(unet, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.full((2,), 700.0)
        context = torch.randn(2, 77, unet_config["context_dim"], generator=g)
        kwargs = {"transformer_options": {}}
        if unet_config.get("adm_in_channels"):
            kwargs["y"] = torch.randn(2, unet_config["adm_in_channels"], generator=g)
        blocks = blocks_mod.ComfyUNetBlocks(unet)
        for fill in (ff.FeatureInheritFiller(blocks, 1), ff.FeatureInheritFiller(blocks, 2), ff.EncoderPropagationFiller(blocks)):
            with torch.no_grad(), ff.captured(fill.capture_modules()) as feats:
                z = unet(x, t, context=context, **kwargs)
            anchor = fillers.Anchor(x=x, z=z, t=t, step=0, features=dict(feats))
            with torch.no_grad():
                assert torch.equal(fill(unet, x, t, anchor, context, kwargs), z), (family, fill.name)
        times = [t, t - 50, t - 120]
        span = fill.decode_span(x, times, anchor, context, kwargs)
        with torch.no_grad():
            one_by_one = [fill(unet, x, tt, anchor, context, kwargs) for tt in times]
        for a, b in zip(span, one_by_one):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not torch.equal(span[0], span[2])
