"""Latent distribution families for the Probabilistic U-Net family and PHiSeg, and the KL between them.

A *family* turns the raw output of an encoder head (``B x P`` for a vector latent, ``B x P x h x w`` for a
spatial latent) into a ``torch.distributions`` object whose event covers everything but the batch dimension:

================================  ==============================  ==================================
family                            parameters per latent (``P``)   distribution
================================  ==============================  ==================================
:class:`AxisAlignedGaussian`      ``2 D``                         ``Independent(Normal)``
:class:`MixtureOfAxisAlignedGaussians`  ``K (1 + 2 D)``           ``MixtureSameFamily`` of the above
:class:`FullCovarianceGaussian`   ``D (D + 3) / 2``               ``MultivariateNormal(scale_tril)``
:class:`MixtureOfFullCovarianceGaussians`  ``K (1 + D (D + 3) / 2)``  ``MixtureSameFamily`` of the above
================================  ==============================  ==================================

(Kohl et al. 2018 use the axis-aligned Gaussian; Bhat et al. 2022 the three generalised families.)

Numerical safety: log standard deviations are clamped to :data:`LOG_SIGMA_RANGE` before ``exp`` (no overflow
to ``inf``, no ``sigma == 0``), the Cholesky diagonal is ``softplus(.) + CHOLESKY_DIAGONAL_EPS`` (strictly
positive), and distributions are built with ``validate_args=False`` so that a diverging run reaches the
loss, which reports the non-finite term with the iteration, instead of failing inside ``torch.distributions``.

:func:`latent_kl_divergence` uses the analytic KL registered in ``torch.distributions`` where one exists
(``Independent(Normal)`` pairs, ``MultivariateNormal`` pairs) and a Monte Carlo estimate otherwise (mixtures,
mixed families). :func:`sample_with_generators` draws one sample per batch row from that row's own
``torch.Generator`` (per-sample seeding, as in the diffusion sampler), so a sample does not depend on its batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)
from torch.distributions import kl_divergence as registered_kl_divergence

__all__ = [
    "LOG_SIGMA_RANGE",
    "CHOLESKY_DIAGONAL_EPS",
    "LatentFamily",
    "AxisAlignedGaussian",
    "MixtureOfAxisAlignedGaussians",
    "FullCovarianceGaussian",
    "MixtureOfFullCovarianceGaussians",
    "ReparameterizedMixture",
    "latent_kl_divergence",
    "sample_with_generators",
]

LOG_SIGMA_RANGE = (-10.0, 10.0)
"""Bounds applied to a predicted log standard deviation before ``exp``: sigma stays in [4.5e-5, 2.2e4]."""

CHOLESKY_DIAGONAL_EPS = 1e-4
"""Added to ``softplus`` of the raw Cholesky diagonal so the covariance stays positive definite."""


class ReparameterizedMixture(MixtureSameFamily):
    """``MixtureSameFamily`` with a reparameterised ``rsample``.

    ``torch.distributions.MixtureSameFamily`` has no ``rsample``. Here a component index is drawn from the
    mixture weights and the chosen component is sampled with its own reparameterisation, so gradients reach the
    component parameters. The discrete choice is passed through a straight-through estimator
    (``one_hot - p.detach() + p``): the value is an exact mixture sample, and the mixture weights receive the
    gradient ``dz/dp_k = z_k``. (The weights also get exact gradients from the KL term through ``log_prob``.)
    """

    has_rsample = True

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        """Draw ``sample_shape + batch_shape + event_shape`` samples with gradients."""
        sample_shape = torch.Size(sample_shape)
        component_samples = self.component_distribution.rsample(sample_shape)  # S x B x K x E
        weights = self.mixture_distribution.probs  # B x K
        index = self.mixture_distribution.sample(sample_shape)  # S x B
        one_hot = F.one_hot(index, num_classes=weights.shape[-1]).to(weights.dtype)
        straight_through = one_hot - weights.detach() + weights  # S x B x K, value == one_hot
        for _ in range(len(self.event_shape)):
            straight_through = straight_through.unsqueeze(-1)
        return (straight_through * component_samples).sum(dim=-1 - len(self.event_shape))


class LatentFamily(ABC):
    """A parameterised family of latent distributions over ``latent_dim``-dimensional vectors.

    Args:
        latent_dim: dimension ``D`` of the latent vector (channels of a spatial latent).
    """

    #: whether spatial parameters ``B x P x h x w`` are accepted too (the event then covers ``h x w``)
    accepts_spatial: bool = False

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = self._at_least_one("latent_dim", latent_dim)

    def _at_least_one(self, name: str, value: int) -> int:
        """``int(value)``, or a ValueError naming this family when it is below 1."""
        if int(value) < 1:
            raise ValueError(f"{type(self).__name__}: {name} must be >= 1, got {value}.")
        return int(value)

    @property
    @abstractmethod
    def num_parameters(self) -> int:
        """Number ``P`` of raw parameters (channels) the encoder head must produce."""

    @abstractmethod
    def _build(self, params: torch.Tensor) -> Distribution:
        """Build the distribution from validated ``B x P`` parameters."""

    def __call__(self, params: torch.Tensor) -> Distribution:
        """Turn raw encoder output into a distribution.

        Args:
            params: ``B x P`` raw parameters (``P == self.num_parameters``); ``B x P x h x w`` too when
                :attr:`accepts_spatial`.

        Returns:
            a distribution with ``batch_shape == (B,)`` and ``event_shape == (D,)`` (``(D, h, w)`` for
            spatial parameters).
        """
        shape_ok = params.ndim == 2 or (self.accepts_spatial and params.ndim > 2)
        if not shape_ok or params.shape[1] != self.num_parameters:
            spatial = " [x h x w]" if self.accepts_spatial else ""
            raise ValueError(
                f"{type(self).__name__}(latent_dim={self.latent_dim}) expects parameters of shape "
                f"B x {self.num_parameters}{spatial}, got {tuple(params.shape)}."
            )
        return self._build(_at_least_float32(params))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(latent_dim={self.latent_dim})"


def _at_least_float32(params: torch.Tensor) -> torch.Tensor:
    """Half-precision parameters (mixed-precision training) are promoted: densities, Cholesky solves and KL
    terms are not reliable (or not implemented) in float16."""
    return params.float() if params.dtype in (torch.float16, torch.bfloat16) else params


def _sigma_from_log_sigma(log_sigma: torch.Tensor) -> torch.Tensor:
    """``exp`` of the clamped log standard deviation (never ``inf``, never ``0``)."""
    return torch.exp(log_sigma.clamp(*LOG_SIGMA_RANGE))


def _cholesky_factor(diagonal_raw: torch.Tensor, off_diagonal: torch.Tensor, latent_dim: int) -> torch.Tensor:
    """Lower-triangular ``... x D x D`` factor with a strictly positive diagonal.

    Args:
        diagonal_raw: ``... x D`` unconstrained values (softplus + eps gives the diagonal).
        off_diagonal: ``... x D (D - 1) / 2`` strictly-lower entries, row-major.
    """
    rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1, device=off_diagonal.device)
    factor = off_diagonal.new_zeros(*off_diagonal.shape[:-1], latent_dim, latent_dim)
    factor[..., rows, cols] = off_diagonal
    diagonal = F.softplus(diagonal_raw) + CHOLESKY_DIAGONAL_EPS
    return factor + torch.diag_embed(diagonal)


def _diagonal_gaussian(mu: torch.Tensor, log_sigma: torch.Tensor, event_dims: int) -> Distribution:
    """``Independent(Normal)`` whose event is the last ``event_dims`` dimensions (sigma: clamped ``exp``)."""
    normal = Normal(mu, _sigma_from_log_sigma(log_sigma), validate_args=False)
    return Independent(normal, event_dims, validate_args=False)


def _full_covariance_gaussian(params: torch.Tensor, latent_dim: int) -> Distribution:
    """``... x P`` parameters ``[mu (D), raw Cholesky diagonal (D), strictly-lower]`` -> ``MultivariateNormal``."""
    d = latent_dim
    mu, diagonal_raw, off_diagonal = params.split([d, d, d * (d - 1) // 2], dim=-1)
    return MultivariateNormal(mu, scale_tril=_cholesky_factor(diagonal_raw, off_diagonal, d), validate_args=False)


class AxisAlignedGaussian(LatentFamily):
    """Gaussian with diagonal covariance (Kohl et al. 2018): parameters ``[mu (D), log_sigma (D)]``.

    Also accepts spatial parameters ``B x 2D x h x w`` (PHiSeg): the result is then an ``Independent(Normal)``
    with ``event_shape == (D, h, w)``, whose KL sums over channels and pixels.
    """

    accepts_spatial = True

    @property
    def num_parameters(self) -> int:
        return 2 * self.latent_dim

    def _build(self, params: torch.Tensor) -> Distribution:
        mu, log_sigma = params.split(self.latent_dim, dim=1)
        return _diagonal_gaussian(mu, log_sigma, params.ndim - 1)


class FullCovarianceGaussian(LatentFamily):
    """Gaussian with full covariance ``L L^T`` (Bhat et al. 2022).

    Parameters: ``[mu (D), raw Cholesky diagonal (D), strictly-lower Cholesky entries (D (D - 1) / 2)]``.
    """

    @property
    def num_parameters(self) -> int:
        d = self.latent_dim
        return 2 * d + d * (d - 1) // 2

    def _build(self, params: torch.Tensor) -> Distribution:
        return _full_covariance_gaussian(params, self.latent_dim)


class _Mixture(LatentFamily):
    """Mixture of ``num_components`` members of one Gaussian family; parameters ``[logits (K), K x component]``.

    Args:
        latent_dim: latent dimension ``D``.
        num_components: number ``K`` of mixture components.
    """

    component_family: type[LatentFamily]
    """The family of one component (its ``num_parameters`` are a component's raw parameters)."""

    def __init__(self, latent_dim: int, num_components: int) -> None:
        super().__init__(latent_dim)
        self.num_components = self._at_least_one("num_components", num_components)
        self.component_num_parameters = self.component_family(latent_dim).num_parameters

    @abstractmethod
    def _components(self, params: torch.Tensor) -> Distribution:
        """``B x K x P_c`` parameters -> component distribution with ``batch_shape == (B, K)``."""

    @property
    def num_parameters(self) -> int:
        return self.num_components * (1 + self.component_num_parameters)

    def _build(self, params: torch.Tensor) -> Distribution:
        k = self.num_components
        logits, component_params = params.split([k, k * self.component_num_parameters], dim=-1)
        component_params = component_params.reshape(params.shape[0], k, self.component_num_parameters)
        return ReparameterizedMixture(
            Categorical(logits=logits, validate_args=False), self._components(component_params), validate_args=False
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(latent_dim={self.latent_dim}, num_components={self.num_components})"


class MixtureOfAxisAlignedGaussians(_Mixture):
    """Mixture of ``K = num_components`` axis-aligned Gaussians over ``D = latent_dim`` (Bhat et al. 2022)."""

    component_family = AxisAlignedGaussian

    def _components(self, params: torch.Tensor) -> Distribution:
        mu, log_sigma = params.split(self.latent_dim, dim=-1)
        return _diagonal_gaussian(mu, log_sigma, 1)


class MixtureOfFullCovarianceGaussians(_Mixture):
    """Mixture of ``K = num_components`` full-covariance Gaussians over ``D = latent_dim`` (Bhat et al. 2022)."""

    component_family = FullCovarianceGaussian

    def _components(self, params: torch.Tensor) -> Distribution:
        return _full_covariance_gaussian(params, self.latent_dim)


def latent_kl_divergence(
    posterior: Distribution,
    prior: Distribution,
    num_samples: int = 16,
    method: str = "auto",
) -> torch.Tensor:
    """KL(posterior || prior) per batch element.

    Args:
        posterior: distribution ``q`` with ``batch_shape == (B,)`` (must support ``rsample`` for Monte Carlo).
        prior: distribution ``p`` with the same batch and event shapes.
        num_samples: posterior samples ``S`` of the Monte Carlo estimate ``mean_s log q(z_s) - log p(z_s)``.
        method: ``"auto"`` (analytic when ``torch.distributions`` registers the pair, otherwise Monte Carlo),
            ``"analytic"`` (error if there is none) or ``"monte_carlo"``.

    Returns:
        ``B`` tensor of KL values (summed over the event: latent dimensions and, for spatial latents, pixels).
    """
    if method not in ("auto", "analytic", "monte_carlo"):
        raise ValueError(f"latent_kl_divergence: method must be 'auto', 'analytic' or 'monte_carlo', got {method!r}.")
    if posterior.batch_shape != prior.batch_shape or posterior.event_shape != prior.event_shape:
        raise ValueError(
            "latent_kl_divergence: posterior and prior shapes differ: batch "
            f"{tuple(posterior.batch_shape)} vs {tuple(prior.batch_shape)}, event "
            f"{tuple(posterior.event_shape)} vs {tuple(prior.event_shape)}."
        )
    if method != "monte_carlo":
        try:
            return registered_kl_divergence(posterior, prior)
        except NotImplementedError:
            if method == "analytic":
                raise NotImplementedError(
                    f"latent_kl_divergence: no analytic KL between {type(posterior).__name__} and "
                    f"{type(prior).__name__}; use method='auto' or 'monte_carlo'."
                ) from None
    if num_samples < 1:
        raise ValueError(f"latent_kl_divergence: num_samples must be >= 1, got {num_samples}.")
    if not posterior.has_rsample:
        raise TypeError(f"latent_kl_divergence: Monte Carlo KL needs rsample, which {type(posterior).__name__} lacks.")
    z = posterior.rsample((num_samples,))  # S x B x E
    return (posterior.log_prob(z) - prior.log_prob(z)).mean(dim=0)


def _standard_normal(generators: Sequence[torch.Generator], shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """One ``shape`` standard-normal draw per generator (on the CPU), stacked and moved to ``like``."""
    noise = torch.stack([torch.randn(shape, generator=generator, dtype=torch.float64) for generator in generators])
    return noise.to(device=like.device, dtype=like.dtype)


def _transform_standard_normal(distribution: Distribution, noise: torch.Tensor) -> torch.Tensor:
    """Map standard-normal ``noise`` (broadcastable to ``batch_shape + event_shape``) to a sample."""
    if isinstance(distribution, Independent) and isinstance(distribution.base_dist, Normal):
        return distribution.base_dist.loc + distribution.base_dist.scale * noise
    if isinstance(distribution, MultivariateNormal):
        return distribution.loc + (distribution.scale_tril @ noise.unsqueeze(-1)).squeeze(-1)
    raise TypeError(
        f"sample_with_generators supports Independent(Normal), MultivariateNormal and mixtures of them, "
        f"got {type(distribution).__name__}."
    )


def sample_with_generators(distribution: Distribution, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw one sample per batch row, row ``i`` from ``generators[i]`` only.

    Args:
        distribution: a family's distribution with ``batch_shape == (R,)``.
        generators: ``R`` CPU generators. Each one gives, in order, a uniform (mixtures only: the component)
            and a standard-normal ``event_shape`` draw.

    Returns:
        ``R x event_shape`` samples (no gradient path is needed: this is for sampling at inference).
    """
    if len(distribution.batch_shape) != 1 or distribution.batch_shape[0] != len(generators):
        raise ValueError(
            f"sample_with_generators: need one generator per batch row, got {len(generators)} generators for "
            f"batch shape {tuple(distribution.batch_shape)}."
        )
    if isinstance(distribution, MixtureSameFamily):
        probs = distribution.mixture_distribution.probs  # R x K
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(probs)
        # inverse CDF: the first component whose cumulative weight exceeds u
        index = (uniforms[:, None] >= probs.cumsum(-1)).sum(-1).clamp(max=probs.shape[-1] - 1)
        components = distribution.component_distribution
        noise = _standard_normal(generators, components.event_shape, probs).unsqueeze(1)  # R x 1 x E
        candidates = _transform_standard_normal(components, noise)  # R x K x E
        return candidates[torch.arange(len(generators), device=index.device), index]
    like = distribution.mean
    return _transform_standard_normal(distribution, _standard_normal(generators, distribution.event_shape, like))
