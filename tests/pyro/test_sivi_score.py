"""The importance-sampled semi-implicit score against closed forms (Pyro backend).

With an affine generator ``mu(eps) = b + A eps`` and a constant ``sigma``, the semi-implicit
marginal is ``N(b, A A^T + sigma^2 I)``, so ``log q`` and ``grad log q`` are exact references.
"""

import math

import pytest
import torch
import zuko

from pyro_mixvi._sivi import ConditionalNormalGenerator, SemiImplicitNormal, importance_score


def affine_generator(mixing_dim, latent_dim, *, gain, sigma, seed=1):
    gen = torch.Generator().manual_seed(seed)
    module = ConditionalNormalGenerator(
        mixing_dim, torch.zeros(latent_dim), (), init_scale=sigma
    )
    matrix = gain * torch.randn(latent_dim, mixing_dim, generator=gen)  # mu(eps) = loc + A eps
    with torch.no_grad():
        # The generator scales its last layer's output by output_multiplier (1 / fan_in).
        module.net[0].weight.copy_(matrix / module.output_multiplier)
        module.loc.copy_(torch.randn(latent_dim, generator=gen))
    cov = matrix @ matrix.T + sigma**2 * torch.eye(latent_dim)
    exact = torch.distributions.MultivariateNormal(module.loc.detach(), cov.detach())
    return module, exact


def exact_score(exact, z):
    z = z.detach().requires_grad_()
    (grad,) = torch.autograd.grad(exact.log_prob(z).sum(), z)
    return grad


def replicate(z, generator, proposal, k, reps, mixing_dim):
    """``reps`` independent estimates ``(reps, N, D)`` of the score and ``(reps, N)`` of log q."""
    out = [importance_score(z, generator, proposal, mixing_dim=mixing_dim,
                            num_importance_samples=k) for _ in range(reps)]
    return torch.stack([o[1] for o in out]), torch.stack([o[0] for o in out])


def train_proposal(generator, mixing_dim, latent_dim, steps=400, batch=256):
    """Forward KL (maximum likelihood of eps given z) on pairs drawn from q."""
    flow = zuko.flows.RealNVP(mixing_dim, latent_dim, transforms=3, hidden_features=(32, 32))
    flow = flow.to(generator.loc.dtype)
    q = SemiImplicitNormal(generator, None, mixing_dim=mixing_dim, latent_dim=latent_dim,
                           num_importance_samples=1, prototype=generator.loc)
    optim = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(steps):
        with torch.no_grad():
            z, eps = q.rsample_with_mixing((batch,))
        loss = -flow(z).log_prob(eps).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    return flow


@pytest.mark.parametrize("proposal_kind", ["prior", "flow"])
def test_score_matches_closed_form_and_error_falls_with_k(dtype, proposal_kind):
    torch.manual_seed(0)
    generator, exact = affine_generator(2, 2, gain=1.0, sigma=0.6)
    proposal = train_proposal(generator, 2, 2, steps=200) if proposal_kind == "flow" else None
    z = exact.sample((6,))
    truth, log_q_exact = exact_score(exact, z), exact.log_prob(z)
    mse = {}
    for k in (8, 64, 512):
        scores, log_qs = replicate(z, generator, proposal, k, reps=40, mixing_dim=2)
        assert scores.dtype == dtype and scores.shape == (40, 6, 2)
        mse[k] = float(((scores - truth) ** 2).mean())
    # Self-normalized IS: mean-squared error ~ c / k, so 8 -> 512 shrinks it ~64-fold; ask 8-fold.
    assert mse[64] < mse[8] and mse[512] < mse[8] / 8, mse
    # At k = 512 the mean of 40 replicates sits within MC error of the exact score; the SNIS bias
    # is O(mse * ...) / k, below the standard error here; 5 standard errors + 2% of |score|.
    mean, stderr = scores.mean(0), scores.std(0) / math.sqrt(40)
    assert torch.all((mean - truth).abs() <= 5 * stderr + 0.02 * truth.abs() + 1e-3)
    # log q_hat is biased low by Jensen (O(1/k)); at k = 512 the gap is small and non-positive
    # up to MC error.
    gap = log_qs.mean(0) - log_q_exact
    assert torch.all(gap <= 5 * log_qs.std(0) / math.sqrt(40) + 1e-3)
    assert torch.all(gap.abs() < 0.05)


def test_flow_proposal_beats_prior_at_equal_k(dtype):
    # A narrow conditional (small sigma, large A) makes q(eps | z) far narrower than p(eps):
    # prior IS wastes its draws, a trained conditional RealNVP does not.
    torch.manual_seed(0)
    generator, exact = affine_generator(2, 2, gain=2.0, sigma=0.25)
    flow = train_proposal(generator, 2, 2, steps=500)
    z = exact.sample((16,))
    truth = exact_score(exact, z)
    errors = {}
    for name, proposal in (("prior", None), ("flow", flow)):
        scores, _ = replicate(z, generator, proposal, 16, reps=30, mixing_dim=2)
        errors[name] = ((scores - truth) ** 2).sum(-1).flatten()
    # Paired per (point, replicate) errors; require the flow's mean error below half the prior's
    # and the difference significant at 4 standard errors.
    diff = errors["prior"] - errors["flow"]
    assert errors["flow"].mean() < 0.5 * errors["prior"].mean(), errors
    assert diff.mean() > 4 * diff.std() / math.sqrt(diff.numel())


def reference_code_score(z, generator, flow, k, mixing_dim):
    """The reference implementation's estimator: autograd of log q_hat through tau's context."""
    z = z.detach().requires_grad_()
    eps, log_tau = flow(z).rsample_and_log_prob((k,))
    loc, scale = generator(eps)
    loc, scale = loc.detach(), scale.detach()
    log_cond = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(-1)
    log_q = torch.logsumexp(log_cond + log_prior - log_tau, 0) - math.log(k)
    (grad,) = torch.autograd.grad(log_q.sum(), z)
    return grad


def test_detached_context_is_consistent_reference_estimator_is_not(dtype):
    # Notes (seed_methods.md 1.3): differentiating through the proposal's context adds
    # -sum_j w_j d/dz log tau(T(u_j; z) | z), which does not vanish as k grows.
    torch.manual_seed(0)
    generator, exact = affine_generator(2, 2, gain=2.0, sigma=0.4)
    flow = train_proposal(generator, 2, 2, steps=300)
    z = exact.sample((32,))
    truth = exact_score(exact, z)

    def mse(fn, k, reps=8):
        errors = [((fn(k) - truth) ** 2).sum(-1).mean() for _ in range(reps)]
        return float(torch.stack(errors).mean())

    ours = {k: mse(lambda k: importance_score(z, generator, flow, mixing_dim=2,
                                              num_importance_samples=k)[1], k) for k in (16, 1024)}
    ref = {k: mse(lambda k: reference_code_score(z, generator, flow, k, 2), k) for k in (16, 1024)}
    # Ours converges (~1/k); the reference's error stays at the size of its bias term.
    assert ours[1024] < ours[16] / 10, ours
    assert ref[1024] > 10 * ours[1024], (ref, ours)
    assert ref[1024] > 0.3 * ref[16], ref


class _ScriptedProposal:
    """A 'conditional distribution' that hands out fixed draws in order (tests chunk merging)."""

    def __init__(self, eps, log_tau):
        self.eps, self.log_tau, self.used = eps, log_tau, 0

    def __call__(self, context):
        return self

    def rsample_and_log_prob(self, shape):
        n = shape[0]
        out = self.eps[self.used:self.used + n], self.log_tau[self.used:self.used + n]
        self.used += n
        return out


def test_chunked_estimate_equals_single_shot(dtype):
    torch.manual_seed(0)
    generator, exact = affine_generator(3, 2, gain=1.5, sigma=0.5)
    z = exact.sample((5,))
    eps = torch.randn(100, 5, 3)
    log_tau = torch.randn(100, 5)
    whole = importance_score(z, generator, _ScriptedProposal(eps, log_tau), mixing_dim=3,
                             num_importance_samples=100)
    chunked = importance_score(z, generator, _ScriptedProposal(eps, log_tau), mixing_dim=3,
                               num_importance_samples=100, chunk_size=7)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(chunked[0], whole[0], rtol=tol, atol=tol)
    torch.testing.assert_close(chunked[1], whole[1], rtol=tol, atol=tol)


def test_own_mixing_estimator_is_bounded_and_consistent(dtype):
    # BSIVI with the draw's own eps among the k draws: consistent as k grows.
    torch.manual_seed(0)
    generator, exact = affine_generator(2, 2, gain=1.0, sigma=0.6)
    q = SemiImplicitNormal(generator, None, mixing_dim=2, latent_dim=2,
                           num_importance_samples=1, prototype=generator.loc)
    z, eps = q.rsample_with_mixing((200,))
    truth = exact_score(exact, z)
    err = {}
    for k in (4, 1024):
        est = importance_score(z, generator, None, mixing_dim=2, num_importance_samples=k,
                               own_mixing=eps)[1]
        err[k] = float(((est - truth) ** 2).sum(-1).mean())
    assert err[1024] < err[4] / 10, err


def test_own_mixing_with_flow_proposal_bounds_log_q_from_above(dtype):
    # With the draw's own eps in one of the k slots (importance-weighted hierarchical bound,
    # Sobolev & Vetrov 2019), E log q_hat >= log q; without it, E log q_hat <= log q (Jensen).
    # Both are checked against the exact Gaussian marginal on average over 400 points x 20
    # repetitions, with 4 standard errors of that average as slack; the score stays consistent.
    torch.manual_seed(0)
    generator, exact = affine_generator(2, 2, gain=1.5, sigma=0.3)
    flow = train_proposal(generator, 2, 2, steps=200)
    q = SemiImplicitNormal(generator, None, mixing_dim=2, latent_dim=2,
                           num_importance_samples=1, prototype=generator.loc)
    with torch.no_grad():
        z, eps = q.rsample_with_mixing((400,))
    log_q = exact.log_prob(z)
    for own, sign in ((eps, 1.0), (None, -1.0)):
        gaps = torch.stack([
            importance_score(z, generator, flow, mixing_dim=2, num_importance_samples=4,
                             own_mixing=own)[0] - log_q
            for _ in range(20)])
        slack = 4 * float(gaps.mean(0).std()) / math.sqrt(z.shape[0])
        assert sign * float(gaps.mean()) > -slack, (own is None, float(gaps.mean()), slack)
    truth = exact_score(exact, z)
    err = {k: float(((importance_score(z, generator, flow, mixing_dim=2,
                                        num_importance_samples=k, own_mixing=eps)[1]
                      - truth) ** 2).sum(-1).mean()) for k in (4, 512)}
    assert err[512] < err[4] / 4, err


@pytest.mark.parametrize("k", [0, -3])
def test_bad_k_raises(k):
    generator, _ = affine_generator(2, 2, gain=1.0, sigma=0.5)
    with pytest.raises(ValueError, match="num_importance_samples must be >= 1"):
        importance_score(torch.zeros(2), generator, None, mixing_dim=2, num_importance_samples=k)
