"""Evaluation metrics, each registered in ``METRICS`` (``vaelab list`` shows them).

One module per family; each holds pure functions of a model (or tensors) and a data iterable,
plus one registered ``metric(ctx) -> list[Entry]`` that labels its numbers:

* ``elbo`` (:mod:`.likelihood`): the true ELBO, its terms, KL per dimension, bits/dim.
* ``loglik`` (:mod:`.likelihood`): importance-sampled log p(x) (Burda et al. 2015), bits/dim.
* ``active-units`` (:mod:`.active_units`): Cov_x(E_q[z_d]) > 0.01.
* ``reconstruction`` (:mod:`.reconstruction`): MSE, PSNR, SSIM.
* ``fd`` (:mod:`.frechet`, :mod:`.features`, :mod:`.inception`): FD-LeNet or FID of
  reconstructions and of prior samples.
* ``probe`` (:mod:`.probe`): linear-probe accuracy on the latent means.
* ``params`` (:mod:`.params`): parameter counts.

scikit-learn and scikit-image are imported inside the functions that use them.
"""

from vaelab.metrics import active_units, frechet, likelihood, params, probe, reconstruction  # noqa: F401
from vaelab.metrics.base import METRICS, READ_BATCH, Entry, EvalContext, MetricUnavailable

# The order metrics run and print in when none are named.
DEFAULT_METRICS = ("elbo", "loglik", "active-units", "reconstruction", "fd", "probe", "params")

__all__ = ["DEFAULT_METRICS", "METRICS", "READ_BATCH", "Entry", "EvalContext", "MetricUnavailable"]
