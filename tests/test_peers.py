"""Side-by-side with mergekit's own TIES and task arithmetic, when mergekit is installed (optional)."""

import pytest
import torch

from pcb_fast import merge

sparsify = pytest.importorskip("mergekit.sparsify")
gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")


def mergekit_ties(base, models, density, weights):
    """mergekit's TIES on one tensor, written with its own sparsify and get_mask."""
    deltas = torch.stack([sparsify.sparsify(m - base, density, sparsify.SparsificationMethod.magnitude) for m in models])
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    deltas = deltas * w
    mask = gta.get_mask(deltas, method="sum")
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + (deltas * mask).sum(dim=0) / divisor


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]])
def test_ties_with_mergekit_options_matches_mergekit(weights):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(64, 48, generator=g), "b": torch.randn(300, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()} for _ in range(3)]
    ours = merge(base, models, method="ties", density=0.3, scope="tensor", sign_ties="positive", topk="exact",
                 lambdas=weights)
    for k in base:
        theirs = mergekit_ties(base[k], [m[k] for m in models], 0.3, weights)
        # mergekit sums over tasks with torch.sum: equal up to the last bit of the sums
        assert torch.allclose(ours[k], theirs, rtol=0, atol=1e-6), k
        print(f"{k}: {int((ours[k] != theirs).sum())} of {theirs.numel()} entries differ in the last bits")
