"""Negative prompt with true classifier-free guidance (diffusers' FluxPipeline true_cfg_scale): each
step also runs the negative prompt, in one batch of 2, and uses v_neg + scale (v - v_neg)."""

import logging
from dataclasses import replace

from flux1.modes.conditioning import Conditioning

log = logging.getLogger("flux1")


def rows(inputs, images: int) -> int:
    """The transformer's rows a step of `images` at once takes: twice over where the negative prompt
    runs (a negative prompt and a scale above 1)."""
    return images * (2 if inputs.negative_prompt is not None and inputs.true_cfg_scale > 1 else 1)


def add_negative(flux, conditioning: Conditioning, inputs, max_length: int) -> Conditioning:
    if inputs.negative_prompt is None:
        if inputs.true_cfg_scale > 1:
            log.warning("--true-cfg-scale %g is unused without --negative-prompt", inputs.true_cfg_scale)
        return conditioning
    if inputs.true_cfg_scale <= 1:
        log.warning(
            "--negative-prompt is unused: it takes --true-cfg-scale above 1 (given %g)", inputs.true_cfg_scale
        )
        return conditioning
    negative = flux.encode_prompt(inputs.negative_prompt, max_length, what="negative prompt")
    return replace(conditioning, negative=negative, true_cfg_scale=inputs.true_cfg_scale)
