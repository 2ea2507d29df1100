"""The posteriordb gold-standard posteriors as Pyro models, keyed by posterior name.

``POSTERIORDB_MODELS[name](data)`` takes the posterior's Stan data (``data.json`` as a dict, e.g.
``mixvi.bench_data.load_posteriordb(name).data``) and returns ``(model, args, kwargs)``; the
model's log joint equals the Stan program's up to a constant. Latent and deterministic site
names equal the names of the reference arrays (``reference.npz``), so guide draws compare with
the reference draws directly; the unconstrained coordinates a guide sees are Stan's.

Same names and parameterizations as ``numpyro_mixvi.posteriordb``. Notes per model:

* Flat Stan priors are :class:`FlatPrior` sites (``ImproperUniform``: log density 0 on the
  support); their ``sample`` returns a fixed feasible point so autoguide initializers work, but
  prior predictive draws of these sites are meaningless.
* ``garch-garch11``: Stan's ``beta1`` lives on ``(0, 1 - alpha1)``, a support that depends on
  ``alpha1``. Autoguides fix a site's support from their prototype trace, so the sampled site
  is ``beta1_frac = beta1 / (1 - alpha1)`` on ``(0, 1)`` (whose logit is Stan's unconstrained
  coordinate) and ``beta1`` is deterministic. The flat prior on the triangle
  ``alpha1 + beta1 < 1`` becomes the factor ``1 - alpha1`` in ``(alpha1, beta1_frac)``: the
  model adds ``log(1 - alpha1)``. (``beta1 ~ Uniform(0, 1 - alpha1)`` would instead put
  ``1/(1 - alpha1)`` on ``beta1`` and miss it; a test pins the difference.)
* ``gp_pois_regr-gp_regr``: ``sigma`` is added to the kernel diagonal **unsquared**, as in the
  posteriordb program.
* ``low_dim_gauss_mix``: ``mu`` is an ordered vector (Stan's ``(mu1, log(mu2 - mu1))``
  coordinates) with the ``N(0, 2)`` prior as a factor; ``theta`` weights the lower component.
* ``eight_schools_noncentered``: the sampled site is ``theta_trans``; ``theta`` is deterministic.

Models are broadcast-safe for leading particle dimensions (``vectorize_particles``,
``Predictive``): observations sit in plates and regressions are written ``(X * beta).sum(-1)``.

Example:
    >>> from mixvi.bench_data import load_posteriordb
    >>> entry = load_posteriordb("arK-arK")                                   # doctest: +SKIP
    >>> model, args, kwargs = POSTERIORDB_MODELS["arK-arK"](entry.data)       # doctest: +SKIP

Users add a posterior (a new folder in the bench data) with :func:`register_posteriordb_model`.

References:
    Magnusson et al., "posteriordb: Testing, benchmarking and developing Bayesian inference
    algorithms" (2025); https://github.com/stan-dev/posteriordb
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["POSTERIORDB_MODELS", "FlatPrior", "register_posteriordb_model"]

ModelBuilder = Callable[[dict[str, Any]], tuple[Callable, tuple, dict]]

POSTERIORDB_MODELS: dict[str, ModelBuilder] = {}
"""Model builders by posterior name: ``builder(data) -> (model, args, kwargs)``."""


def register_posteriordb_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder(data) -> (model, args, kwargs)`` as posterior ``name``.

    A registered name replaces an existing entry (so a user can override a model).

    Example:
        >>> @register_posteriordb_model("mydata-mymodel")
        ... def build(data):
        ...     y = torch.as_tensor(data["y"], dtype=torch.get_default_dtype())
        ...     def model(y):
        ...         loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        ...         with pyro.plate("obs", len(y)):
        ...             pyro.sample("y", dist.Normal(loc, 1.0), obs=y)
        ...     return model, (y,), {}
        >>> "mydata-mymodel" in POSTERIORDB_MODELS
        True
        >>> del POSTERIORDB_MODELS["mydata-mymodel"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty posterior name like 'arK-arK'; got {name!r}")

    def register(builder: ModelBuilder) -> ModelBuilder:
        if not callable(builder):
            raise TypeError(f"builder for {name!r} must be callable; got {type(builder).__name__}")
        POSTERIORDB_MODELS[name] = builder
        return builder

    return register


def _tensor(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


class FlatPrior(dist.ImproperUniform):
    """Stan's missing prior statement: an improper uniform density (log density 0) on ``support``.

    Unlike Pyro's ``ImproperUniform``, ``sample`` returns a fixed feasible point, the image of 0
    under ``biject_to(support)`` (for example 1 for ``positive``, 0.5 for ``unit_interval``),
    so Pyro's autoguide initializers (``init_to_median``, ``init_to_feasible``, ...) work.
    It is not a draw: an improper prior has none.
    """

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:  # noqa: B008 (torch's default)
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        transform = torch.distributions.biject_to(self.support)
        zeros = torch.zeros(transform.inverse_shape(shape))
        return transform(zeros)


def _flat(support, event_shape=()) -> FlatPrior:
    return FlatPrior(support, (), event_shape)


@register_posteriordb_model("eight_schools-eight_schools_noncentered")
def eight_schools_noncentered(data: dict) -> tuple[Callable, tuple, dict]:
    """``theta = mu + tau theta_trans``, ``theta_trans ~ N(0, 1)``, ``mu ~ N(0, 5)``,
    ``tau ~ HalfCauchy(5)``, ``y_j ~ N(theta_j, sigma_j)``."""

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
        with pyro.plate("schools", len(y)):
            theta_trans = pyro.sample("theta_trans", dist.Normal(y.new_tensor(0.0), 1.0))
            theta = pyro.deterministic("theta", mu + tau * theta_trans)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return model, (_tensor(data["y"]), _tensor(data["sigma"])), {}


@register_posteriordb_model("eight_schools-eight_schools_centered")
def eight_schools_centered(data: dict) -> tuple[Callable, tuple, dict]:
    """``theta_j ~ N(mu, tau)``, ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``,
    ``y_j ~ N(theta_j, sigma_j)`` (a funnel in ``(theta, log tau)``)."""

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
        with pyro.plate("schools", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return model, (_tensor(data["y"]), _tensor(data["sigma"])), {}


@register_posteriordb_model("kilpisjarvi_mod-kilpisjarvi")
def kilpisjarvi(data: dict) -> tuple[Callable, tuple, dict]:
    """``alpha ~ N(pmualpha, psalpha)``, ``beta ~ N(pmubeta, psbeta)``, ``sigma`` flat on
    ``(0, inf)``, ``y_i ~ N(alpha + beta x_i, sigma)`` (``x`` uncentred: corr -0.99999)."""
    priors = {k: float(data[k]) for k in ("pmualpha", "psalpha", "pmubeta", "psbeta")}

    def model(x, y):
        alpha = pyro.sample("alpha", dist.Normal(x.new_tensor(priors["pmualpha"]),
                                                 priors["psalpha"]))
        beta = pyro.sample("beta", dist.Normal(x.new_tensor(priors["pmubeta"]), priors["psbeta"]))
        sigma = pyro.sample("sigma", _flat(constraints.positive))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)

    return model, (_tensor(data["x"]), _tensor(data["y"])), {}


@register_posteriordb_model("kidiq-kidscore_interaction")
def kidscore_interaction(data: dict) -> tuple[Callable, tuple, dict]:
    """``beta`` flat on ``R^4``, ``sigma ~ HalfCauchy(2.5)``, ``kid_score ~ N(beta_1 +
    beta_2 hs + beta_3 iq + beta_4 hs iq, sigma)``."""
    hs, iq = _tensor(data["mom_hs"]), _tensor(data["mom_iq"])
    design = torch.stack([torch.ones_like(hs), hs, iq, hs * iq], -1)

    def model(design, kid_score):
        beta = pyro.sample("beta", _flat(constraints.real_vector, (design.shape[-1],)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(design.new_tensor(2.5)))
        with pyro.plate("obs", len(kid_score)):
            mean = (design * beta).sum(-1)
            pyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)

    return model, (design, _tensor(data["kid_score"])), {}


@register_posteriordb_model("garch-garch11")
def garch11(data: dict) -> tuple[Callable, tuple, dict]:
    """GARCH(1,1) with flat priors: ``s_1 = sigma1``, ``s_t^2 = alpha0 + alpha1 (y_{t-1} - mu)^2
    + beta1 s_{t-1}^2``, ``y_t ~ N(mu, s_t)``; ``(alpha1, beta1)`` uniform on the triangle.

    Sampled sites ``mu``, ``alpha0``, ``alpha1``, ``beta1_frac = beta1 / (1 - alpha1)``;
    ``beta1`` is deterministic and the triangle's prior adds ``log(1 - alpha1)`` (module notes).
    """
    return _garch11(data, triangle_correction=True)


def _garch11(data: dict, *, triangle_correction: bool) -> tuple[Callable, tuple, dict]:
    def model(y, sigma1):
        mu = pyro.sample("mu", _flat(constraints.real))
        alpha0 = pyro.sample("alpha0", _flat(constraints.positive))
        alpha1 = pyro.sample("alpha1", _flat(constraints.unit_interval))
        beta1_frac = pyro.sample("beta1_frac", _flat(constraints.unit_interval))
        beta1 = pyro.deterministic("beta1", (1 - alpha1) * beta1_frac)
        if triangle_correction:
            pyro.factor("triangle_prior", (1 - alpha1).log())
        shocks = (y[..., :-1] - mu[..., None]) ** 2
        variances = [sigma1**2 * torch.ones_like(mu)]
        for shock in shocks.unbind(-1):  # sequential recursion over t = 2..T
            variances.append(alpha0 + alpha1 * shock + beta1 * variances[-1])
        scale = torch.stack(variances, -1).sqrt()
        pyro.sample("y", dist.Normal(mu[..., None], scale).to_event(1), obs=y)

    return model, (_tensor(data["y"]), float(data["sigma1"])), {}


@register_posteriordb_model("arK-arK")
def ark(data: dict) -> tuple[Callable, tuple, dict]:
    """AR(K): ``alpha, beta_k ~ N(0, 10)``, ``sigma ~ HalfCauchy(2.5)``,
    ``y_t ~ N(alpha + sum_k beta_k y_{t-k}, sigma)`` for ``t = K+1..T``."""
    y, order = _tensor(data["y"]), int(data["K"])
    lags = torch.stack([y[order - 1 - k: len(y) - 1 - k] for k in range(order)], -1)

    def model(lags, y_next):
        alpha = pyro.sample("alpha", dist.Normal(lags.new_tensor(0.0), 10.0))
        beta = pyro.sample("beta", dist.Normal(lags.new_zeros(lags.shape[-1]), 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(lags.new_tensor(2.5)))
        with pyro.plate("obs", len(y_next)):
            mean = alpha + (lags * beta).sum(-1)
            pyro.sample("y", dist.Normal(mean, sigma), obs=y_next)

    return model, (lags, y[order:]), {}


@register_posteriordb_model("low_dim_gauss_mix-low_dim_gauss_mix")
def low_dim_gauss_mix(data: dict) -> tuple[Callable, tuple, dict]:
    """``y_n ~ theta N(mu_1, sigma_1) + (1 - theta) N(mu_2, sigma_2)`` with ``mu`` ordered,
    ``mu_k ~ N(0, 2)``, ``sigma_k ~ HalfNormal(2)``, ``theta ~ Beta(5, 5)``."""

    def model(y):
        mu = pyro.sample("mu", _flat(constraints.ordered_vector, (2,)))
        pyro.factor("mu_prior", dist.Normal(y.new_tensor(0.0), 2.0).log_prob(mu).sum(-1))
        sigma = pyro.sample("sigma", dist.HalfNormal(y.new_full((2,), 2.0)).to_event(1))
        theta = pyro.sample("theta", dist.Beta(y.new_tensor(5.0), 5.0))
        weights = torch.stack([theta, 1 - theta], -1)
        with pyro.plate("obs", len(y)):
            mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights),
                                             dist.Normal(mu, sigma))
            pyro.sample("y", mixture, obs=y)

    return model, (_tensor(data["y"]),), {}


@register_posteriordb_model("gp_pois_regr-gp_regr")
def gp_regr(data: dict) -> tuple[Callable, tuple, dict]:
    """``y ~ MVN(0, K)``, ``K_ij = alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + sigma delta_ij``
    (``sigma`` unsquared, as posteriordb writes it), ``rho ~ Gamma(25, 4)``,
    ``alpha ~ HalfNormal(2)``, ``sigma ~ HalfNormal(1)``."""
    return _gp_regr(data, square_sigma=False)


def _gp_regr(data: dict, *, square_sigma: bool) -> tuple[Callable, tuple, dict]:
    def model(x, y):
        rho = pyro.sample("rho", dist.Gamma(x.new_tensor(25.0), 4.0))
        alpha = pyro.sample("alpha", dist.HalfNormal(x.new_tensor(2.0)))
        sigma = pyro.sample("sigma", dist.HalfNormal(x.new_tensor(1.0)))
        sq_dist = (x[:, None] - x[None, :]) ** 2
        rho, alpha, sigma = rho[..., None, None], alpha[..., None, None], sigma[..., None, None]
        noise = sigma**2 if square_sigma else sigma
        cov = alpha**2 * (-sq_dist / (2 * rho**2)).exp() + noise * torch.eye(len(x), dtype=x.dtype)
        pyro.sample("y", dist.MultivariateNormal(x.new_zeros(len(x)), cov), obs=y)

    return model, (_tensor(data["x"]), _tensor(data["y"])), {}
