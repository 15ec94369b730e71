"""The reference path against hand-computed cases of docs/design.md 2.2-2.4 and an independent scalar oracle."""

import math

import pytest
import torch

from pcb_fast.reference import pcb_official, pcb_paper


def close(got, expected, tol=1e-6):
    expected = torch.tensor(expected, dtype=torch.float32)
    assert torch.allclose(got, expected, rtol=tol, atol=tol), (got.tolist(), expected.tolist())


# ---- hand-computed cases (the derivations are in the comments)

def test_single_task_keeps_entries_above_threshold():
    # |tau| = [.5, 1, 2]; lo=.5, hi=2; N = [0, 1/3, 1]; P = [tanh .25, e^(1/9) tanh 1, e tanh 4]
    # = [.245, .851, 2.716]; t = sort(P)[int(3 * .5)] = .851: only the last entry is kept, scale 1.
    got = pcb_official(torch.tensor([[0.5, -1.0, 2.0]]), ratio=0.5, clamp_ratio=0.0)
    close(got, [0.0, 0.0, 2.0])


def test_two_tasks_ratio_one():
    # tau1 = [1, 2], tau2 = [3, -1]; S = [4, 1].
    # task 1: N = [0, 1], P1 = [tanh 4, e^2 tanh 2] = [.999, 7.12]; t = min: scale1 = [0, 1].
    # task 2: N = [1, 0], P2 = [e^2 tanh 12, tanh(-1)] = [7.39, -.762]; t = min: scale2 = [1, 0].
    # tau_m = [(0 + 3) / 1, (2 + 0) / 1].
    got = pcb_official(torch.tensor([[1.0, 2.0], [3.0, -1.0]]), ratio=1.0, clamp_ratio=0.0)
    close(got, [3.0, 2.0])


def test_all_zero_task_contributes_nothing_and_no_nan():
    # task 1 is all zero: N = 0 (max == min), P = 0 everywhere, M == t: scale 0, not NaN.
    # task 2: |tau| = [1, 2, 3, 4], N = [0, 1/3, 2/3, 1], P = exp(2 N^2) tanh(tau^2) increasing;
    # t = sort(P)[2]: only the last entry is kept.
    got = pcb_official(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]), ratio=0.5, clamp_ratio=0.0)
    close(got, [0.0, 0.0, 0.0, 4.0])


def test_all_zero_everything_gives_zero():
    got = pcb_official(torch.zeros(3, 5))
    assert torch.equal(got, torch.zeros(5))


def test_small_d_clips_top_entry_to_second_largest():
    # D = 100 < 10000 with a = 1e-4: hi = sort(|tau|)[int(100 * .9999 - 1)] = sort[98] = 99, so the
    # entry 100 is clipped to 99 and ties with it. ratio .03: t = sort(P)[97] (the 98), kept: 99, 100->99.
    tau = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    got = pcb_official(tau.unsqueeze(0), ratio=0.03, clamp_ratio=1e-4)
    expected = torch.zeros(100)
    expected[98], expected[99] = 99.0, -99.0
    close(got, expected.tolist())


def test_ties_at_top_keep_nothing_when_threshold_is_max():
    # ratio .02: t = sort(P)[98] is the clipped pair's score, equal to M: nothing is above t (the
    # authors' off-by-one keeps only entries strictly above t), so the merge is zero.
    tau = torch.arange(1, 101, dtype=torch.float32).unsqueeze(0)
    assert torch.equal(pcb_official(tau, ratio=0.02, clamp_ratio=1e-4), torch.zeros(100))


def test_d_equals_one_and_two():
    # D = 1: lo = hi, N = 0, one score: t = M, nothing kept.
    assert torch.equal(pcb_official(torch.tensor([[0.3], [-0.2]])), torch.zeros(1))
    # D = 2, ratio 1: t = min score, the entry with the larger score is kept in each task.
    got = pcb_official(torch.tensor([[1.0, 2.0]]), ratio=1.0, clamp_ratio=0.0)
    close(got, [0.0, 2.0])


def test_lambdas_weight_inside_mean():
    # Same as test_two_tasks_ratio_one: each position has one kept task, so lambda scales it.
    got = pcb_official(torch.tensor([[1.0, 2.0], [3.0, -1.0]]), ratio=1.0, clamp_ratio=0.0, lambdas=[0.5, 2.0])
    close(got, [6.0, 1.0])


def test_paper_single_task():
    # Norm(tau^2) = [0, 1]; intra = inter = softmax([0, 1]); beta = [.072, .534]; t = sort(beta)[1]
    # = max: the mask keeps entry 2 only; entry 1 has no kept task: 0.
    close(pcb_paper(torch.tensor([[1.0, 2.0]]), ratio=0.5), [0.0, 2.0])


def test_paper_two_tasks():
    # tau1 = [1, 2], tau2 = [2, 1]. intra1 = softmax(2 * [0, 1]); inter1 = softmax([0, 1]) +
    # softmax(Norm([2, 2]) = [0, 0]) = [.769, 1.231]; beta1 = [.0917, 1.0844], beta2 mirrored.
    # ratio 1 keeps all: tau_m = (beta1 tau1 + beta2 tau2) / (beta1 + beta2) = 1.92206 at both.
    e = math.e
    intra = [1 / (1 + e**2), e**2 / (1 + e**2)]
    inter = [1 / (1 + e) + 0.5, e / (1 + e) + 0.5]
    b1 = [intra[0] * inter[0], intra[1] * inter[1]]
    expected = (b1[0] * 1 + b1[1] * 2) / (b1[0] + b1[1])
    close(pcb_paper(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), ratio=1.0), [expected, expected])
    assert abs(expected - 1.92206) < 1e-4


# ---- an independent scalar oracle (plain Python floats, sorted lists) on random small inputs

def scalar_pcb(rows, ratio, a, inter):
    """docs/design.md 2.2 in float64 scalars, written independently of the torch code."""
    n, D = len(rows), len(rows[0])
    sign = lambda x: (x > 0) - (x < 0)
    clipped, normalized = [], []
    for row in rows:
        mags = [abs(x) for x in row]
        s = sorted(mags)
        lo, hi = s[int(D * a)], s[int(D * (1 - a) - 1)]
        lo = min(lo, hi)
        c = [min(max(m, lo), hi) for m in mags]
        normalized.append([(x - lo) / (hi - lo) if hi > lo else 0.0 for x in c])
        clipped.append([sign(x) * m for x, m in zip(row, c)])
    signed = [[sign(x) * v for x, v in zip(row, nrow)] for row, nrow in zip(rows, normalized)]
    total = [sum(r[d] for r in rows) for d in range(D)]
    total_signed = [sum(r[d] for r in signed) for d in range(D)]
    scales = []
    for i in range(n):
        p = []
        for d in range(D):
            intra = math.exp(n * normalized[i][d] ** 2)  # float64: no overflow up to n ~ 700
            if inter == "sum":
                x = math.tanh(rows[i][d] * total[d])
            elif inter == "normalized_sum":
                x = math.tanh(rows[i][d] * total_signed[d])
            else:
                x = sum(math.tanh(signed[i][d] * signed[j][d]) for j in range(n))
            p.append(intra * x)
        s = sorted(p)
        t, m = s[min(int(D * (1 - ratio)), D - 1)], s[-1]
        scales.append([(max(v, t) - t) / (m - t) if m > t else 0.0 for v in p])
    out = []
    for d in range(D):
        num = sum(clipped[i][d] * scales[i][d] for i in range(n))
        den = sum(scales[i][d] for i in range(n))
        out.append(num / max(den, 1e-12))
    return out


@pytest.mark.parametrize("inter", ["sum", "normalized_sum", "pairwise"])
@pytest.mark.parametrize("n,D,ratio,a", [(1, 7, 0.3, 0.0), (3, 40, 0.2, 0.01), (4, 101, 0.1, 0.05), (2, 13, 1.0, 0.2)])
def test_matches_scalar_oracle(inter, n, D, ratio, a):
    g = torch.Generator().manual_seed(n * 1000 + D)
    tv = torch.randn(n, D, generator=g)
    got = pcb_official(tv, ratio=ratio, clamp_ratio=a, inter=inter)
    expected = scalar_pcb(tv.double().tolist(), ratio, a, inter)
    close(got, expected, tol=1e-5)


def test_large_n_does_not_overflow():
    # n = 100 > 88: exp(n N^2) overflows float32; the shifted form must give the exact merge.
    g = torch.Generator().manual_seed(7)
    tv = torch.randn(100, 30, generator=g)
    got = pcb_official(tv, ratio=0.2, clamp_ratio=0.0)
    assert torch.isfinite(got).all()
    close(got, scalar_pcb(tv.double().tolist(), 0.2, 0.0, "sum"), tol=1e-5)


@pytest.mark.parametrize("variant", [pcb_official, pcb_paper])
def test_lambdas_follow_the_task_vectors_device(variant):
    """The lambda column is built on the task vectors' device: with CUDA task vectors (the triton
    backend's device) the reference raised a device mismatch. The meta device stands in for CUDA here:
    any device other than the CPU's fails the same way."""
    tv = torch.empty(3, 64, device="meta")
    out = variant(tv, lambdas=[0.5, 1.0, 2.0])
    assert out.device.type == "meta" and out.shape == (64,)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("dare", {"p": [0.1, 0.2, 0.3]}),
                                            ("dare_ties", {}), ("ties", {}), ("breadcrumbs", {})])
def test_the_baselines_build_their_constants_on_the_task_vectors_device(method, params):
    """As PCB's above: lambdas, DARE's keep mask and per-task rescale on the task vectors' device (the
    meta device standing in for CUDA; average reads its weights' sum on the host, which meta cannot)."""
    from pcb_fast.reference import baselines

    tv = torch.empty(3, 64, device="meta")
    out = getattr(baselines, method)(tv, lambdas=[0.5, 1.0, 2.0], segments=[("w", (64,))], **params)
    assert out.device.type == "meta" and out.shape == (64,)
