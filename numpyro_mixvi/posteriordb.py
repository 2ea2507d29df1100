"""The posteriordb gold-standard posteriors as NumPyro models, keyed by posterior name.

``POSTERIORDB_MODELS[name](data)`` takes the posterior's Stan data (``data.json`` as a dict, e.g.
``mixvi.bench_data.load_posteriordb(name).data``) and returns ``(model, args, kwargs)``; the
model's log joint equals the Stan program's up to a constant. Latent and deterministic site
names equal the names of the reference arrays (``reference.npz``), so guide draws compare with
the reference draws directly; the unconstrained coordinates a guide sees are Stan's.

Same names and parameterizations as ``pyro_mixvi.posteriordb``. Notes per model:

* Flat Stan priors are :class:`FlatPrior` (NumPyro's ``ImproperUniform``: log density 0 on the
  support) sites; NumPyro's initializers handle them, but they have no prior draws.
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
``Predictive``): observations sit in plates, regressions are written ``(X * beta).sum(-1)`` and
the GARCH recursion is a ``lax.scan``.

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

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = ["POSTERIORDB_MODELS", "FlatPrior", "register_posteriordb_model"]

ModelBuilder = Callable[[dict[str, Any]], tuple[Callable, tuple, dict]]

POSTERIORDB_MODELS: dict[str, ModelBuilder] = {}
"""Model builders by posterior name: ``builder(data) -> (model, args, kwargs)``."""

FlatPrior = dist.ImproperUniform
"""Stan's missing prior statement: NumPyro's ``ImproperUniform`` (log density 0 on its support)."""


def register_posteriordb_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder(data) -> (model, args, kwargs)`` as posterior ``name``.

    A registered name replaces an existing entry (so a user can override a model).

    Example:
        >>> @register_posteriordb_model("mydata-mymodel")
        ... def build(data):
        ...     y = jnp.asarray(data["y"])
        ...     def model(y):
        ...         loc = numpyro.sample("loc", dist.Normal(0.0, 10.0))
        ...         with numpyro.plate("obs", len(y)):
        ...             numpyro.sample("y", dist.Normal(loc, 1.0), obs=y)
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


def _array(value):
    return jnp.asarray(value, dtype=jnp.result_type(float))


def _flat(support, event_shape=()) -> dist.ImproperUniform:
    return FlatPrior(support, (), event_shape)


@register_posteriordb_model("eight_schools-eight_schools_noncentered")
def eight_schools_noncentered(data: dict) -> tuple[Callable, tuple, dict]:
    """``theta = mu + tau theta_trans``, ``theta_trans ~ N(0, 1)``, ``mu ~ N(0, 5)``,
    ``tau ~ HalfCauchy(5)``, ``y_j ~ N(theta_j, sigma_j)``."""

    def model(y, sigma):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros((), y.dtype), 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(jnp.full((), 5.0, y.dtype)))
        with numpyro.plate("schools", len(y)):
            theta_trans = numpyro.sample("theta_trans", dist.Normal(jnp.zeros((), y.dtype), 1.0))
            theta = numpyro.deterministic("theta", mu + tau * theta_trans)
            numpyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return model, (_array(data["y"]), _array(data["sigma"])), {}


@register_posteriordb_model("eight_schools-eight_schools_centered")
def eight_schools_centered(data: dict) -> tuple[Callable, tuple, dict]:
    """``theta_j ~ N(mu, tau)``, ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``,
    ``y_j ~ N(theta_j, sigma_j)`` (a funnel in ``(theta, log tau)``)."""

    def model(y, sigma):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros((), y.dtype), 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(jnp.full((), 5.0, y.dtype)))
        with numpyro.plate("schools", len(y)):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return model, (_array(data["y"]), _array(data["sigma"])), {}


@register_posteriordb_model("kilpisjarvi_mod-kilpisjarvi")
def kilpisjarvi(data: dict) -> tuple[Callable, tuple, dict]:
    """``alpha ~ N(pmualpha, psalpha)``, ``beta ~ N(pmubeta, psbeta)``, ``sigma`` flat on
    ``(0, inf)``, ``y_i ~ N(alpha + beta x_i, sigma)`` (``x`` uncentred: corr -0.99999)."""
    priors = {k: float(data[k]) for k in ("pmualpha", "psalpha", "pmubeta", "psbeta")}

    def model(x, y):
        alpha = numpyro.sample("alpha", dist.Normal(jnp.full((), priors["pmualpha"], x.dtype),
                                                    priors["psalpha"]))
        beta = numpyro.sample("beta", dist.Normal(jnp.full((), priors["pmubeta"], x.dtype),
                                                  priors["psbeta"]))
        sigma = numpyro.sample("sigma", _flat(constraints.positive))
        with numpyro.plate("obs", len(y)):
            numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)

    return model, (_array(data["x"]), _array(data["y"])), {}


@register_posteriordb_model("kidiq-kidscore_interaction")
def kidscore_interaction(data: dict) -> tuple[Callable, tuple, dict]:
    """``beta`` flat on ``R^4``, ``sigma ~ HalfCauchy(2.5)``, ``kid_score ~ N(beta_1 +
    beta_2 hs + beta_3 iq + beta_4 hs iq, sigma)``."""
    hs, iq = _array(data["mom_hs"]), _array(data["mom_iq"])
    design = jnp.stack([jnp.ones_like(hs), hs, iq, hs * iq], -1)

    def model(design, kid_score):
        beta = numpyro.sample("beta", _flat(constraints.real_vector, (design.shape[-1],)))
        sigma = numpyro.sample("sigma", dist.HalfCauchy(jnp.full((), 2.5, design.dtype)))
        with numpyro.plate("obs", len(kid_score)):
            mean = (design * beta).sum(-1)
            numpyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)

    return model, (design, _array(data["kid_score"])), {}


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
        mu = numpyro.sample("mu", _flat(constraints.real))
        alpha0 = numpyro.sample("alpha0", _flat(constraints.positive))
        alpha1 = numpyro.sample("alpha1", _flat(constraints.unit_interval))
        beta1_frac = numpyro.sample("beta1_frac", _flat(constraints.unit_interval))
        beta1 = numpyro.deterministic("beta1", (1 - alpha1) * beta1_frac)
        if triangle_correction:
            numpyro.factor("triangle_prior", jnp.log1p(-alpha1))
        shocks = jnp.moveaxis((y[..., :-1] - mu[..., None]) ** 2, -1, 0)

        def step(variance, shock):  # sequential recursion over t = 2..T
            variance = alpha0 + alpha1 * shock + beta1 * variance
            return variance, variance

        first = jnp.full(jnp.shape(mu), sigma1**2, y.dtype)
        _, rest = jax.lax.scan(step, first, shocks)
        scale = jnp.sqrt(jnp.concatenate([first[None], rest]))
        numpyro.sample("y", dist.Normal(mu[..., None], jnp.moveaxis(scale, 0, -1)).to_event(1),
                       obs=y)

    return model, (_array(data["y"]), float(data["sigma1"])), {}


@register_posteriordb_model("arK-arK")
def ark(data: dict) -> tuple[Callable, tuple, dict]:
    """AR(K): ``alpha, beta_k ~ N(0, 10)``, ``sigma ~ HalfCauchy(2.5)``,
    ``y_t ~ N(alpha + sum_k beta_k y_{t-k}, sigma)`` for ``t = K+1..T``."""
    y, order = _array(data["y"]), int(data["K"])
    lags = jnp.stack([y[order - 1 - k: len(y) - 1 - k] for k in range(order)], -1)

    def model(lags, y_next):
        alpha = numpyro.sample("alpha", dist.Normal(jnp.zeros((), lags.dtype), 10.0))
        beta = numpyro.sample(
            "beta", dist.Normal(jnp.zeros(lags.shape[-1], lags.dtype), 10.0).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfCauchy(jnp.full((), 2.5, lags.dtype)))
        with numpyro.plate("obs", len(y_next)):
            mean = alpha + (lags * beta).sum(-1)
            numpyro.sample("y", dist.Normal(mean, sigma), obs=y_next)

    return model, (lags, y[order:]), {}


@register_posteriordb_model("low_dim_gauss_mix-low_dim_gauss_mix")
def low_dim_gauss_mix(data: dict) -> tuple[Callable, tuple, dict]:
    """``y_n ~ theta N(mu_1, sigma_1) + (1 - theta) N(mu_2, sigma_2)`` with ``mu`` ordered,
    ``mu_k ~ N(0, 2)``, ``sigma_k ~ HalfNormal(2)``, ``theta ~ Beta(5, 5)``."""

    def model(y):
        mu = numpyro.sample("mu", _flat(constraints.ordered_vector, (2,)))
        numpyro.factor("mu_prior", dist.Normal(jnp.zeros((), y.dtype), 2.0).log_prob(mu).sum(-1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.full((2,), 2.0, y.dtype)).to_event(1))
        theta = numpyro.sample("theta", dist.Beta(jnp.full((), 5.0, y.dtype), 5.0))
        weights = jnp.stack([theta, 1 - theta], -1)
        with numpyro.plate("obs", len(y)):
            mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights),
                                             dist.Normal(mu, sigma))
            numpyro.sample("y", mixture, obs=y)

    return model, (_array(data["y"]),), {}


@register_posteriordb_model("gp_pois_regr-gp_regr")
def gp_regr(data: dict) -> tuple[Callable, tuple, dict]:
    """``y ~ MVN(0, K)``, ``K_ij = alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + sigma delta_ij``
    (``sigma`` unsquared, as posteriordb writes it), ``rho ~ Gamma(25, 4)``,
    ``alpha ~ HalfNormal(2)``, ``sigma ~ HalfNormal(1)``."""
    return _gp_regr(data, square_sigma=False)


def _gp_regr(data: dict, *, square_sigma: bool) -> tuple[Callable, tuple, dict]:
    def model(x, y):
        rho = numpyro.sample("rho", dist.Gamma(jnp.full((), 25.0, x.dtype), 4.0))
        alpha = numpyro.sample("alpha", dist.HalfNormal(jnp.full((), 2.0, x.dtype)))
        sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones((), x.dtype)))
        sq_dist = (x[:, None] - x[None, :]) ** 2
        rho, alpha, sigma = rho[..., None, None], alpha[..., None, None], sigma[..., None, None]
        noise = sigma**2 if square_sigma else sigma
        cov = alpha**2 * jnp.exp(-sq_dist / (2 * rho**2)) + noise * jnp.eye(len(x), dtype=x.dtype)
        numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(len(x), x.dtype), cov), obs=y)

    return model, (_array(data["x"]), _array(data["y"])), {}
