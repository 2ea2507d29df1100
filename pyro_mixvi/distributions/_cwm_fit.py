"""Maximum-likelihood fitting of a ClassifierWeightedMixture (the loop behind ``fit``)."""

from __future__ import annotations

import copy

import torch
from pyro.distributions import constraints
from torch.distributions import transform_to
from tqdm.auto import tqdm

from pyro_mixvi.distributions.cwm import ClassifierWeightedMixture

_POSITIVE = constraints.softplus_positive
_CHOLESKY = constraints.softplus_lower_cholesky


def _to_unconstrained(cwm: ClassifierWeightedMixture) -> dict:
    params = {"locs": cwm.locs, "logits": cwm.logits}
    if cwm.scale is not None:
        params["scale"] = transform_to(_POSITIVE).inv(cwm.scale)
    else:
        params["scale_tril"] = transform_to(_CHOLESKY).inv(cwm.scale_tril)
    params["classifier_params"] = [tuple(layer) for layer in cwm.classifier_params]
    params["flows"] = cwm.flows
    return params


def _from_unconstrained(params: dict) -> ClassifierWeightedMixture:
    if "scale" in params:
        scales = {"scale": transform_to(_POSITIVE)(params["scale"])}
    else:
        scales = {"scale_tril": transform_to(_CHOLESKY)(params["scale_tril"])}
    return ClassifierWeightedMixture(
        params["locs"], logits=params["logits"],
        classifier_params=params["classifier_params"], flows=params["flows"], **scales,
    )


_STRUCTURED = ("classifier_params", "flows")


def _leaves(params: dict) -> list[torch.Tensor]:
    tensors = [v for k, v in params.items() if k not in _STRUCTURED]
    flows = params["flows"] or ()
    return (tensors + [t for layer in params["classifier_params"] for t in layer]
            + [p for flow in flows for p in flow.parameters()])


def fit_cwm(
    cwm: ClassifierWeightedMixture,
    samples: torch.Tensor,
    *,
    num_steps: int,
    batch_size: int,
    lr: float,
    progress_bar: bool,
    generator: torch.Generator | None,
) -> tuple[ClassifierWeightedMixture, torch.Tensor]:
    """Adam on the mean negative log-likelihood of random minibatches (with replacement).

    Scales are optimized through softplus (diagonal) or the softplus-Cholesky bijection, so
    they stay positive; flow components (if any) are deep copies trained in place. Every step
    checks the loss is finite and raises otherwise.
    """
    params = _to_unconstrained(cwm)
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()
              if k not in _STRUCTURED} | {
        "classifier_params": [tuple(t.detach().clone().requires_grad_() for t in layer)
                              for layer in params["classifier_params"]],
        "flows": None if cwm.flows is None else tuple(copy.deepcopy(f) for f in cwm.flows)}
    optimizer = torch.optim.Adam(_leaves(params), lr=lr)
    num_samples = samples.shape[0]
    batch = min(batch_size, num_samples)
    losses = samples.new_empty(num_steps)
    bar = tqdm(range(num_steps), disable=not progress_bar, desc="CWM fit")
    for step in bar:
        index = torch.randint(num_samples, (batch,), generator=generator,
                              device=samples.device)
        loss = -_from_unconstrained(params).log_prob(samples[index]).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"step {step}: the CWM negative log-likelihood is {loss.item()}; "
                "lower lr or start from ClassifierWeightedMixture.from_samples"
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if step % 50 == 0:
            bar.set_postfix(nll=f"{loss.item():.4f}")
    if not all(torch.isfinite(t).all() for t in _leaves(params)):
        raise FloatingPointError("a CWM parameter became non-finite during fit; lower lr")
    detached = {k: v.detach() for k, v in params.items() if k not in _STRUCTURED}
    detached["classifier_params"] = [tuple(t.detach() for t in layer)
                                     for layer in params["classifier_params"]]
    detached["flows"] = params["flows"]
    return _from_unconstrained(detached), losses
