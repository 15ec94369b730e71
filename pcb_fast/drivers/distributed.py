"""One rank's share of a distributed merge on the triton backend (docs/design.md 8): its keys on its
GPU, merged with the statistics of the whole model through pcb_fast.io.distributed's collectives."""

from __future__ import annotations

import torch

from ..core import checks
from ..gpu import backend as triton_backend
from ..io.distributed import Comm
from ..methods import SPECS


def merge_on_device(base_ck, model_cks, merged: list, local: set, writer, out_dtype, comm: Comm, *, method: str,
                    lam: float, lambdas, scope: str, params: dict) -> dict:
    """One rank's share of a distributed merge on the triton backend: its keys (``local``) loaded onto
    its device, merged by pcb_fast.gpu.backend with the statistics of the whole model (every merged
    key: ``merged``) through ``comm``, written by ``writer``. Bad data is recorded with comm.fail and
    raised on every rank at the next collective. Returns {"kept", "entries"} of the whole model."""
    params = SPECS[method].for_kernels(params)
    device = comm.merge_device
    keys = [k for k in merged if k in local]
    base, models, out = {}, [{} for _ in model_cks], {}
    for key in keys:
        base[key] = base_ck.read(key).to(device)
        for model, ck in zip(models, model_cks):
            model[key] = ck.read(key).to(device)
        out[key] = torch.empty(base[key].shape, dtype=base[key].dtype, device=device)
    starts, position = {}, 0
    for key in merged:  # each key's first position in the whole model: the column sample's positions
        starts[key] = position
        position += base_ck.numel(key)
    info = triton_backend.merge_state_dicts(base, models, keys, out, [ck.name for ck in model_cks], lam=lam,
                                            scope=scope, lambdas=lambdas, method=method, comm=comm,
                                            entries=position, device=device, starts=starts, **params)
    for key in keys:
        values = out[key].reshape(-1).to(out_dtype(key))
        try:
            checks.check_merged(key, out[key], values)
            writer.write(key, 0, values.cpu())
        except (ValueError, OSError) as e:
            comm.fail(str(e))
    return info
