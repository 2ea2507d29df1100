"""Helpers shared by the zuko-backed flows' users: the identity (zeroed output layer) init."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def zero_last_layers(flow: nn.Module) -> nn.Module:
    """Zero the output layer of every conditioner (zuko's ``hyper`` networks): identity flow.

    Each coupling or autoregressive layer's shift and log-scale are then 0 (Glow-style init), so
    the flow starts as the identity while every weight still gets a gradient. Shared by
    AutoFlowMixture's experts and ClassifierWeightedMixture's component flows; modifies ``flow``
    in place and returns it.
    """
    for module in flow.modules():
        hyper = getattr(module, "hyper", None)
        if isinstance(hyper, nn.Module):
            # zuko's MLP layers are its own Linear class, so look for weight-bearing layers.
            layers = [m for m in hyper.modules() if isinstance(getattr(m, "weight", None), Tensor)]
            with torch.no_grad():
                layers[-1].weight.zero_()
                if getattr(layers[-1], "bias", None) is not None:
                    layers[-1].bias.zero_()
    return flow
