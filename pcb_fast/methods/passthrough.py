"""Passthrough: one model's tensors, unchanged or scaled (mergekit's ``passthrough``), mostly to
stack layer ranges of models (mergekit's ``slices:``, pcb_fast.io.slices).

theta = theta_1, or theta_1 * scale where the model's ``scale`` is given (a value that may vary by
tensor, e.g. 0 for some projections of repeated layers). mergekit 0.1.5's operation, in the compute
dtype.
"""

from __future__ import annotations

from ..core import checks
from .spec import MethodSpec, Param
from .weight_space import COMPUTE_DTYPE, merge_weights, model_count, no_weights


def check_scale(value):
    return None if value is None else checks.as_float("scale", value)


check_one = model_count(1, "passthrough takes exactly one model (per slice); got {n}")


def merge_passthrough(source, sink, options, *, scale=None, compute_dtype="float32", lambdas=None, block_width=None):
    """The model's tensors (times ``scale`` where given), every tensor on its own."""
    no_weights("passthrough", lambdas)
    check_one({}, source.n)
    scale = checks.check_per_task("scale", scale, 1, check_scale)
    scale = scale[0] if isinstance(scale, list) else scale
    return merge_weights(source, sink, options, lambda key, base,
                         models: models[0] if scale is None else models[0] * scale,
                         lambda key: {}, with_base=False, compute_dtype=compute_dtype)


EXACT_COMPUTE = ("float32", "float64", "inputs")  # compute dtypes that hold every input value exactly


def copies(params: dict, key: str) -> bool:
    """Whether the output of ``key`` is the model's tensor as it is (no scale, no rounding before the
    output dtype): a merge of files then copies it."""
    own = dict(params)
    per_key = own.pop("segment_params", None)
    if per_key is not None:
        own.update(per_key(key))
    return own.get("scale") is None and own.get("compute_dtype", "float32") in EXACT_COMPUTE


SPEC = MethodSpec(
    name="passthrough", merge=merge_passthrough, summary="Passthrough",
    citation="mergekit's passthrough (layer stacking)", url="https://github.com/arcee-ai/mergekit",
    params=(Param("scale", None, check_scale, "multiply the model's tensors by this", per_model=True, flag=False),
            COMPUTE_DTYPE),
    check_together=check_one, backends=("torch",), mergekit="passthrough", mergekit_defaults={"scope": "tensor"},
    single_pass=lambda params: True, uses_statistics=False, weight_space=True, copies=copies)
