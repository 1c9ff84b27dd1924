"""The speedup knob in ComfyUI: Morse KSampler and Morse Model Patch asked for a speedup pick the fill and pattern
from the shipped table for the model's kind and sampler, spend at most their share of plain sampling's steps, show
the choice on the node and in the run's log line, and refuse a speedup out of reach before sampling."""
import logging
import re

import pytest
import torch

import tiny_dits as td
from comfy_host import conditioning

STEPS = 12


def _node(host, name):
    return host.nodes.NODE_CLASS_MAPPINGS[name]


def _ksampler(host, model, speedup, steps=STEPS, sampler="euler", latent=None, pos=None, neg=None, cfg=3.0, **extra):
    latent = latent if latent is not None else torch.zeros(1, 4, 16, 16)
    return _node(host, "MorseKSampler").execute(model, 7, steps, cfg, sampler, "normal", pos or conditioning(1),
                                                neg or conditioning(2), {"samples": latent}, 1.0, speedup=speedup,
                                                **extra)


def _log_line(caplog) -> str:
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Morse: ") and "Dash steps" in r.getMessage())


@pytest.mark.parametrize("speedup,share", [("1.5x", 1 / 1.5), ("2x", 1 / 2), ("3x", 1 / 3)])
def test_morse_ksampler_asked_for_a_speedup_spends_at_most_its_share_and_says_what_it_chose(host, tiny, caplog, speedup,
                                                                                              share):
    with caplog.at_level(logging.INFO, logger="morse"):
        out = _ksampler(host, tiny, speedup)
    assert torch.isfinite(out.result[0]["samples"]).all()
    shown = out.ui.as_dict()["text"][0]
    assert shown.startswith(f"Morse chose {speedup}: ") and "unet/euler" in shown and "expects trajectory RMSE" in shown
    line = _log_line(caplog)
    spent = float(re.search(r"; ([\d.]+) LSD spent vs (\d+)", line).group(1))
    assert spent <= STEPS * share * 1.05 and f"speedup {speedup}: " in line and "expects" in line, line


def test_quality_first_and_a_speedup_out_of_reach(host, tiny, caplog):
    with caplog.at_level(logging.INFO, logger="morse"):
        out = _ksampler(host, tiny, "quality first", sampler="dpmpp_2m")
    assert "unet/dpmpp_2m" in out.ui.as_dict()["text"][0]
    with pytest.raises(ValueError, match=r"Morse: Morse cannot give 4x with euler at 3 steps on a unet model; the "
                                         r"most it can give there is 3.00x"):
        _ksampler(host, tiny, "4x", steps=3)


def test_morse_model_patch_chooses_at_each_run_for_the_sigmas_step_count(host, tiny, caplog):
    comfy = host.comfy
    out = _node(host, "MorseModelPatch").execute(tiny, speedup="2x")
    assert "chosen at each run" in out.ui.as_dict()["text"][0]
    sigmas = torch.tensor([14.6, 9.0, 6.0, 4.0, 2.5, 1.6, 1.0, 0.6, 0.3, 0.1, 0.0])  # 10 steps
    guider = comfy.samplers.CFGGuider(out.result[0])
    guider.set_conds(conditioning(1), conditioning(2))
    guider.set_cfg(3.0)
    with caplog.at_level(logging.INFO, logger="morse"):
        guider.sample(torch.randn(1, 4, 16, 16), torch.zeros(1, 4, 16, 16), comfy.samplers.sampler_object("euler"),
                      sigmas, seed=1)
    line = _log_line(caplog)
    assert float(re.search(r"; ([\d.]+) LSD spent vs 10", line).group(1)) <= 5.0 * 1.05, line


def test_a_flow_dit_gets_the_dit_table(host, caplog):
    family = td.FAMILIES["flux"]
    model = td.build(host, family)
    with caplog.at_level(logging.INFO, logger="morse"):
        out = _ksampler(host, model, "2x", latent=td.latent(family, 1), pos=td.conditioning(family, 1, 1),
                        neg=td.conditioning(family, 2, 1), cfg=1.0)
    assert "dit/euler" in out.ui.as_dict()["text"][0]
    assert float(re.search(r"; ([\d.]+) LSD spent", _log_line(caplog)).group(1)) <= STEPS / 2 * 1.05
