"""FusionBench algorithms that run pcb_fast's engine (``pip install "pcb_fast[fusionbench]"``).

FusionBench (github.com/tanganke/fusion_bench) describes a merge by a method config whose
``_target_`` names an algorithm class, and calls ``algorithm.run(modelpool)`` with a model pool
(``_pretrained_`` plus the fine-tuned models, ``modelpool.model_names``). The classes here follow
that convention and FusionBench's own names and parameters, so a FusionBench user switches by
changing only ``_target_``:

.. code-block:: yaml

    method:
      _target_: pcb_fast.integrations.fusion_bench.PCBMergingAlgorithm
      ratio: 0.1
      scaling_factor: 1.0
    # or FusionBench's own methods on the same engine, with their parameters:
    #   _target_: pcb_fast.integrations.fusion_bench.TiesMergingAlgorithm  (scaling_factor, threshold,
    #             remove_keys, merge_func)
    #   _target_: pcb_fast.integrations.fusion_bench.TaskArithmeticAlgorithm  (scaling_factor)

Every class returns a new merged module (:func:`pcb_fast.merge_modules`: the pool's models are never
modified; tied parameters are merged once and stay tied). What differs from FusionBench's own
implementations: integer buffers are the pretrained model's (FusionBench's task arithmetic adds them);
a tied parameter counts once in global statistics (FusionBench's flat vectors count it under each
name); DARE's drops come from pcb_fast's counter-based generator (``seed``), so they follow the same
distribution as FusionBench's ``torch.bernoulli`` draws but are not the same draws; a fine-tuned model
equal to the pretrained one is left out of the task list (with a warning, as mergekit does).

Without FusionBench installed the classes still work on any object with FusionBench's model-pool
interface (``model_names``, ``load_model``, ``has_pretrained``) or on a dict of modules; with it they
are FusionBench ``BaseAlgorithm`` subclasses (configs, YAML round trips, its programs).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..modules import merge_modules

try:
    from fusion_bench.method import BaseAlgorithm as _Base
    from fusion_bench.mixins import auto_register_config

    HAVE_FUSION_BENCH = True
except ImportError:  # the same classes, on the part of FusionBench's BaseAlgorithm they use
    HAVE_FUSION_BENCH = False

    class _Base:
        def __init__(self, **kwargs):
            if kwargs:
                raise ValueError(f"{type(self).__name__} has no parameter {sorted(kwargs)[0]!r}")

    def auto_register_config(cls):
        return cls

PRETRAINED = "_pretrained_"


class _DictPool:
    """A dict of modules seen as a FusionBench model pool (``_pretrained_`` and the fine-tuned ones)."""

    def __init__(self, models: dict):
        self._models = models

    @property
    def model_names(self) -> list:
        return [name for name in self._models if not (name.startswith("_") and name.endswith("_"))]

    @property
    def has_pretrained(self) -> bool:
        return PRETRAINED in self._models

    def load_model(self, name):
        return self._models[name]


def _pool(modelpool):
    if all(hasattr(modelpool, attr) for attr in ("model_names", "load_model", "has_pretrained")):
        return modelpool
    if isinstance(modelpool, dict) and all(isinstance(m, nn.Module) for m in modelpool.values()):
        return _DictPool(modelpool)
    raise ValueError(f"modelpool is a {type(modelpool).__name__}; expected a FusionBench model pool or a dict of "
                     f"torch.nn.Module with {PRETRAINED!r} and the fine-tuned models")


def _module(model, name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} of the pool is a {type(model).__name__}; these algorithms merge "
                         "torch.nn.Module models (load the pool's models as modules)")
    return model


def merge_pool(modelpool, method: str, *, scaling_factor: float = 1.0, lambdas=None, scope: str = "global",
               remove_keys=(), **params) -> nn.Module:
    """Merge a FusionBench model pool (or a dict of modules) with pcb_fast ``method``: the pool's
    ``_pretrained_`` is the base (the average of a pool without one starts from its first model),
    ``modelpool.model_names`` are the tasks in that order (``lambdas`` one per model), and
    theta = theta_pre + scaling_factor * tau_m. ``remove_keys``: state dict keys (exact names, as
    FusionBench's) copied from the pretrained model instead of merged."""
    pool = _pool(modelpool)
    names = list(pool.model_names)
    if not names:
        raise ValueError(f"the model pool holds no fine-tuned model to merge (only {PRETRAINED!r} or nothing)")
    if pool.has_pretrained:
        base = _module(pool.load_model(PRETRAINED), PRETRAINED)
    elif method == "average":
        base = _module(pool.load_model(names[0]), names[0])
    else:
        raise ValueError(f"method {method!r} merges task vectors and needs the pretrained model: add {PRETRAINED!r} "
                         "to the pool's models")
    if isinstance(remove_keys, str):
        remove_keys = [remove_keys]
    models = [_module(pool.load_model(name), name) for name in names]
    exclude = [f"^{re.escape(key)}$" for key in remove_keys]
    return merge_modules(base, models, method=method, lam=scaling_factor, lambdas=lambdas, scope=scope,
                         exclude=exclude, model_names=[f"model {name!r}" for name in names], **params)


class _Algorithm(_Base):
    """What every algorithm here shares: the hooks FusionBench's programs call around ``run``."""

    def on_run_start(self):
        pass

    def on_run_end(self):
        pass


@auto_register_config
class PcbFastAlgorithm(_Algorithm):
    """Any pcb_fast method by its own name and parameters: ``method`` (pcb, average, task_arithmetic,
    ties, dare, dare_ties, breadcrumbs, breadcrumbs_ties), ``params`` (the method's parameters, e.g.
    ``{density: 0.2}``), ``scaling_factor`` (lam), ``lambdas``, ``scope``, ``remove_keys``."""

    def __init__(self, method: str = "pcb", scaling_factor: float = 1.0, lambdas=None, scope: str = "global",
                 remove_keys=(), params=None, **kwargs: Any):
        self.method, self.scaling_factor, self.lambdas, self.scope = method, scaling_factor, lambdas, scope
        self.remove_keys, self.params = remove_keys, params
        super().__init__(**kwargs)

    def run(self, modelpool) -> nn.Module:
        params = dict(self.params or {})
        return merge_pool(modelpool, self.method, scaling_factor=self.scaling_factor, lambdas=_list(self.lambdas),
                          scope=self.scope, remove_keys=list(self.remove_keys or ()), **params)


@auto_register_config
class PCBMergingAlgorithm(_Algorithm):
    """PCB-Merging (Du et al., NeurIPS 2024), as the authors' code (``variant="official"``) or the
    paper's equations (``"paper"``): ``ratio`` (keep ratio), ``clamp_ratio`` (outlier clip; the
    authors' experiment scripts use 0.01), ``inter`` (sum, normalized_sum, pairwise),
    ``scaling_factor`` (lam), ``lambdas`` (per-model weights in the weighted mean), ``scope``
    ("global": statistics over the whole model, as the authors)."""

    def __init__(self, ratio: float = 0.1, clamp_ratio: float = 1e-4, inter: str = "sum", variant: str = "official",
                 scaling_factor: float = 1.0, lambdas=None, scope: str = "global", remove_keys=(), **kwargs: Any):
        self.ratio, self.clamp_ratio, self.inter, self.variant = ratio, clamp_ratio, inter, variant
        self.scaling_factor, self.lambdas, self.scope, self.remove_keys = scaling_factor, lambdas, scope, remove_keys
        super().__init__(**kwargs)

    def run(self, modelpool) -> nn.Module:
        return merge_pool(modelpool, "pcb", scaling_factor=self.scaling_factor, lambdas=_list(self.lambdas),
                          scope=self.scope, remove_keys=list(self.remove_keys or ()), ratio=self.ratio,
                          clamp_ratio=self.clamp_ratio, inter=self.inter, variant=self.variant)


@auto_register_config
class TaskArithmeticAlgorithm(_Algorithm):
    """FusionBench's task arithmetic: theta = theta_pre + scaling_factor * sum_i tau_i (Ilharco et al.)."""

    def __init__(self, scaling_factor: float, remove_keys=(), **kwargs: Any):
        self.scaling_factor, self.remove_keys = scaling_factor, remove_keys
        super().__init__(**kwargs)

    def run(self, modelpool) -> nn.Module:
        return merge_pool(modelpool, "task_arithmetic", scaling_factor=self.scaling_factor,
                          remove_keys=list(self.remove_keys or ()))


@auto_register_config
class SimpleAverageAlgorithm(_Algorithm):
    """FusionBench's simple average of the pool's fine-tuned models (model soups, uniform)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)

    def run(self, modelpool) -> nn.Module:
        return merge_pool(modelpool, "average")


@auto_register_config
class TiesMergingAlgorithm(_Algorithm):
    """FusionBench's TIES-Merging (Yadav et al.), global over the model as there: ``threshold`` is
    the kept share per task (20 means the top 20%; values up to 1 are fractions), ``merge_func``
    "sum" (FusionBench's default: the sum of the entries that agree with the elected sign) or "mean"
    (the authors' disjoint mean), ``scaling_factor`` (lam), ``remove_keys``."""

    def __init__(self, scaling_factor: float, threshold: float, remove_keys=(), merge_func: str = "sum",
                 **kwargs: Any):
        self.scaling_factor, self.threshold, self.remove_keys, self.merge_func = (scaling_factor, threshold,
                                                                                  remove_keys, merge_func)
        super().__init__(**kwargs)

    def run(self, modelpool) -> nn.Module:
        if self.merge_func not in ("sum", "mean"):
            raise ValueError(f"merge_func={self.merge_func!r} is not supported; choose 'sum' or 'mean'")
        return merge_pool(modelpool, "ties", scaling_factor=self.scaling_factor,
                          remove_keys=list(self.remove_keys or ()),
                          density=_share(self.threshold, "threshold"), normalize=self.merge_func == "mean")


@auto_register_config
class DareTaskArithmetic(_Algorithm):
    """FusionBench's DARE + task arithmetic (Yu et al.): drop each task-vector entry with probability
    ``sparsity_ratio``, rescale the rest by 1 / (1 - sparsity_ratio) when ``rescale``, then task
    arithmetic with ``scaling_factor``; ``seed`` chooses pcb_fast's counter-based drops."""

    def __init__(self, scaling_factor: float, sparsity_ratio: float, only_on_linear_weights: bool = False,
                 rescale: bool = True, seed: int = 0, remove_keys=(), **kwargs: Any):
        self.scaling_factor, self.sparsity_ratio = scaling_factor, sparsity_ratio
        self.only_on_linear_weights, self.rescale, self.seed, self.remove_keys = (only_on_linear_weights, rescale,
                                                                                  seed, remove_keys)
        super().__init__(**kwargs)

    def run(self, modelpool) -> nn.Module:
        if self.only_on_linear_weights:
            raise ValueError("only_on_linear_weights=True is not supported (one drop rule for every merged key); "
                             "set it to false, or list the other keys in remove_keys")
        return merge_pool(modelpool, "dare", scaling_factor=self.scaling_factor,
                          remove_keys=list(self.remove_keys or ()),
                          p=self.sparsity_ratio, seed=self.seed, rescale="inverse" if self.rescale else "none")


def _share(value, name: str) -> float:
    """A FusionBench share: a percentage above 1 (20 -> 0.2), else a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number (a percentage such as 20, or a fraction such as 0.2)")
    return value / 100 if value > 1 else float(value)


def _list(values):
    """Lists from YAML arrive as omegaconf ListConfig: plain floats for the engine's checks."""
    return None if values is None else [float(v) for v in values]
