"""The triton backend's tests on a CUDA GPU, at scale: the CUDA versions of tests/test_triton.py's
backend tests, under the per-entry tolerance contract of docs/design.md 9.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json] [--quick]

Run by ``bash benchmarks/gpu_check.sh`` (with bench_gpu) on a machine with a CUDA GPU; no pytest
needed. PCB (both variants, every ``inter``, n up to 64, fp32 and bf16, D up to 2^24, matrices and
bf16 state dicts) against the reference path on the same GPU; every baseline against the torch
backend on this machine's CPU (strict: no entry may differ); TIES' election on data with exact
cancellations (bit for bit); run-to-run identity. Prints one line per check and writes a JSON with
the GPU named after every check (``"complete": false`` until the last one: a run stopped by a time
limit leaves what it measured); exits 1 if any check fails. ``--quick``: the same checks at small sizes (minutes on a
CPU under TRITON_INTERPRET=1 is still too slow for CI; it is for trying the plumbing).

The tolerance helpers (:func:`disagreements`, :func:`official_near`, :func:`paper_near`) are the
ones tests/test_triton.py asserts with, so the CPU tests and the GPU check apply one rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
RTOL = 2e-5  # merged values: |got - ref| <= RTOL * max|ref| (about 150 ulps of the largest value)
# an entry's score within this relative distance of t_i may fall on either side of it: scores differ
# by a few ulps (~1e-7 each), t_i is an order statistic of such scores, so 1e-5 is ~80 ulps of room
SCORE_RTOL = 1e-5


# ---- the tolerance contract (docs/design.md 9)


def near_threshold(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[D] bool: positions where some task's score lies within SCORE_RTOL (relative) of its threshold."""
    t = t.reshape(-1, 1)
    return ((scores - t).abs() <= SCORE_RTOL * t.abs()).any(0)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(1, keepdim=True)
    span = x.amax(1, keepdim=True) - low
    return torch.where(span > 0, (x - low) / span, torch.zeros((), dtype=x.dtype, device=x.device))


def _task_order_sum(x: torch.Tensor) -> torch.Tensor:
    total = x[0].clone()
    for row in x[1:]:
        total += row
    return total


def official_scores(tv: torch.Tensor, clamp: float, inter: str) -> torch.Tensor:
    """The official score P [n, D] with the reference's operations (docs/design.md 2.2 steps 1-5;
    n <= 64, so no exponent shift), on tv's device."""
    n, D = tv.shape
    magnitude = tv.abs()
    ordered = torch.sort(magnitude, dim=1).values
    lo, hi = ordered[:, int(D * clamp)].unsqueeze(1), ordered[:, int(D * (1 - clamp) - 1)].unsqueeze(1)
    del ordered
    normalized = _minmax(torch.clamp(magnitude, torch.minimum(lo, hi), hi))
    del magnitude
    intra = torch.exp(n * normalized**2)
    if inter == "sum":
        inter_score = torch.tanh(tv * _task_order_sum(tv))
    elif inter == "normalized_sum":
        inter_score = torch.tanh(tv * _task_order_sum(torch.sign(tv) * normalized))
    else:
        signed = torch.sign(tv) * normalized
        inter_score = torch.tanh(signed * signed[0])
        for j in range(1, n):
            inter_score += torch.tanh(signed * signed[j])
    return intra * inter_score


def _kth(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    D = scores.shape[1]
    return torch.kthvalue(scores, min(int(D * (1 - ratio)), D - 1) + 1, dim=1).values


def official_near(tv: torch.Tensor, ratio: float, clamp: float, inter: str) -> torch.Tensor:
    """[D] bool: where the reference's official keep decision is within SCORE_RTOL of a threshold."""
    scores = official_scores(tv.float(), clamp, inter)
    return near_threshold(scores, _kth(scores, ratio))


def paper_near(tv: torch.Tensor, ratio: float) -> torch.Tensor:
    """[D] bool: the same for the paper variant's beta."""
    from pcb_fast.reference.pcb import paper_scores

    scores = paper_scores(tv.float())
    return near_threshold(scores, _kth(scores, ratio))


def disagreements(got: torch.Tensor, ref: torch.Tensor, near: torch.Tensor | None = None) -> dict:
    """The per-entry rule: entries that differ from ``ref`` by more than RTOL * max|ref| or are kept
    on one side only (``differing``) must all be ``near`` a threshold (None: none may differ);
    ``unexplained`` counts those that are not."""
    got, ref = got.reshape(-1).float(), ref.reshape(-1).float().to(got.device)
    near = torch.zeros_like(ref, dtype=torch.bool) if near is None else near.reshape(-1).to(got.device)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    scale = scale or 1.0
    differ = ((got != 0) != (ref != 0)) | ((got - ref).abs() > RTOL * scale)
    unexplained = differ & ~near
    return {"max_rel_diff": float((got - ref).abs().max()) / scale if ref.numel() else 0.0,
            "differing": int(differ.sum()), "near": int(near.sum()), "unexplained": int(unexplained.sum()),
            "first_unexplained": unexplained.nonzero().view(-1)[:10].tolist()}


# ---- the checks


def _pcb_matrix(n, D, dtype, variant, inter, ratio, clamp, device, gen, weighted=False):
    """PCB of an [n, D] matrix on the device against the reference path on the same device; ``weighted``:
    with lambdas (the reference builds its lambda column on the task vectors' device)."""
    import pcb_fast

    from pcb_fast.gpu import backend as triton_backend

    tv = (torch.randn(n, D, generator=gen, device=device) * 0.01).to(dtype)
    params = dict(ratio=ratio, clamp_ratio=clamp, inter=inter, variant=variant,
                  lambdas=[0.5 + i / n for i in range(n)] if weighted else None)
    if device.type == "cuda":  # compile the kernels for this shape first (the interpreter compiles nothing)
        pcb_fast.pcb_merge(tv, backend="triton", **params)
    got, profile = torch.empty(D, device=device), {}
    triton_backend.pcb_merge_matrix(list(tv), got, profile=profile, **params)
    ref = pcb_fast.pcb_merge(tv.float(), backend="reference", **params)
    near = official_near(tv, ratio, clamp, inter) if variant == "official" else paper_near(tv, ratio)
    # the passes that ran (a "... radix level" pass: a sampled bracket missed) and their seconds
    return dict(disagreements(got, ref, near), passes={k: round(v, 5) for k, v in profile.items()})


def _models(n, shapes, dtype, device, gen):
    base = {f"w{i}": (torch.randn(s, generator=gen, device=device) * 0.02).to(dtype) for i, s in enumerate(shapes)}
    models = [{k: (v.float() + 1e-3 * torch.randn(v.shape, generator=gen, device=device)).to(dtype)
               for k, v in base.items()} for _ in range(n)]
    return base, models


def _pcb_state_dicts(n, shapes, dtype, variant, device, gen, scope="global"):
    import pcb_fast

    base, models = _models(n, shapes, dtype, device, gen)
    got = pcb_fast.merge(base, models, method="pcb", variant=variant, ratio=0.1, backend="triton", scope=scope)
    ref = pcb_fast.merge(base, models, method="pcb", variant=variant, ratio=0.1, backend="reference", scope=scope)
    keys = list(base)
    taus = [torch.stack([(m[k].float() - base[k].float()).reshape(-1) for m in models]) for k in keys]
    near_of = lambda tv: official_near(tv, 0.1, 1e-4, "sum") if variant == "official" else paper_near(tv, 0.1)  # noqa: E731
    if scope == "global":  # one threshold over every key
        near = near_of(torch.cat(taus, dim=1))
    else:  # a threshold per key
        near = torch.cat([near_of(tv) for tv in taus])
    del taus
    # bf16 outputs: compare theta - base in float32 (both sides rounded to bf16 once)
    got_tau = torch.cat([(got[k].float() - base[k].float()).reshape(-1) for k in keys])
    ref_tau = torch.cat([(ref[k].float() - base[k].float()).reshape(-1) for k in keys])
    result = disagreements(got_tau, ref_tau, near)
    if dtype != torch.float32:  # a float32 difference within the rule can round to a neighbouring bf16 value
        ulp = (torch.cat([ref[k].float().reshape(-1) for k in keys]).abs() * 2.0**-7).clamp_min(2.0**-133)
        off = ((got_tau - ref_tau).abs() > ulp) & ~near
        result.update(beyond_one_ulp=int(off.sum()), unexplained=int(off.sum()),
                      first_unexplained=off.nonzero().view(-1)[:10].tolist())
    return result


BASELINES = [("average", {}), ("task_arithmetic", dict(lambdas="ramp")), ("ties", dict(density=0.2)),
             ("ties", dict(density=0.3, topk="exact")), ("ties", dict(density=0.2, scope="tensor")),
             ("dare", dict(p=0.9, seed=1)), ("dare_ties", dict(p=0.7, seed=2)), ("breadcrumbs", {})]


def _baseline(n, shapes, method, params, device, gen):
    """A baseline on the device against the torch backend on the CPU: no entry may differ; kept counts equal."""
    import pcb_fast

    params = dict(params)
    if params.get("lambdas") == "ramp":
        params["lambdas"] = [0.5 + i / n for i in range(n)]
    base, models = _models(n, shapes, torch.float32, device, gen)
    report_gpu, report_cpu = {}, {}
    got = pcb_fast.merge(base, models, method=method, backend="triton", lam=0.8, report=report_gpu, **params)
    cpu = ({k: v.cpu() for k, v in base.items()}, [{k: v.cpu() for k, v in m.items()} for m in models])
    expected = pcb_fast.merge(*cpu, method=method, backend="torch", lam=0.8, report=report_cpu, **params)
    got_tau = torch.cat([(got[k].cpu() - cpu[0][k]).reshape(-1) for k in base])
    expected_tau = torch.cat([(expected[k] - cpu[0][k]).reshape(-1) for k in base])
    result = disagreements(got_tau, expected_tau)
    result["kept_equal"] = report_gpu["kept"] == report_cpu["kept"]
    if not result["kept_equal"]:
        result["unexplained"] += 1
    return result


def _ties_election(n, D, device, gen):
    """Quantized deltas with exact cancellations and tiny values that another summation order would
    keep or lose: TIES and DARE-TIES equal the torch backend bit for bit."""
    import pcb_fast

    steps = torch.randint(-2, 3, (n, D), generator=gen, device=device).float() * 0.5
    tiny = torch.randint(-1, 2, (n, D), generator=gen, device=device).float() * 2.0**-30
    tv = torch.where(torch.rand(n, D, generator=gen, device=device) < 0.3, tiny, steps)
    base = {"w": torch.zeros(D, device=device)}
    models = [{"w": row.clone()} for row in tv]
    cpu = ({"w": base["w"].cpu()}, [{"w": m["w"].cpu()} for m in models])
    differing = 0
    for method, params in [("ties", dict(density=1.0)), ("ties", dict(density=0.6)), ("dare_ties", dict(p=0.5))]:
        got = pcb_fast.merge(base, models, method=method, backend="triton", **params)["w"].cpu()
        expected = pcb_fast.merge(*cpu, method=method, backend="torch", **params)["w"]
        differing += int((got != expected).sum())
    return {"differing": differing, "unexplained": differing}


def _run_to_run(n, D, device, gen):
    import pcb_fast

    tv = torch.randn(n, D, generator=gen, device=device) * 0.01
    a = pcb_fast.pcb_merge(tv, inter="pairwise", backend="triton")
    b = pcb_fast.pcb_merge(tv, inter="pairwise", backend="triton")
    differing = int((a != b).sum())
    return {"differing": differing, "unexplained": differing}


def checks(quick: bool) -> list:
    """(name, function of (device, generator)) for every check; ``quick`` shrinks sizes and task counts."""
    big, mid, small = (1 << 24, 1 << 22, 1 << 20) if not quick else (4096, 2048, 1024)
    N = (lambda k: k) if not quick else (lambda k: min(k, 3))  # noqa: E731
    f32, bf16 = torch.float32, torch.bfloat16
    pcb = [  # (n, D, dtype, variant, inter, ratio, clamp)
        (8, big, f32, "official", "sum", 0.1, 1e-4),
        (8, big, bf16, "official", "sum", 0.1, 1e-4),
        (16, mid, f32, "official", "normalized_sum", 0.2, 0.01),
        (64, small, f32, "official", "pairwise", 0.1, 1e-3),
        (64, mid, bf16, "official", "sum", 0.05, 1e-4),
        (8, mid, f32, "paper", "sum", 0.1, 0.0),
        (64, small // 16, f32, "paper", "sum", 0.2, 0.0),
    ]
    out = []
    for variant in ("official", "paper"):  # lambdas on the device, for the reference path too
        out.append((f"{variant} with lambdas n={N(8)} D={small} fp32", lambda d, g, v=variant: _pcb_matrix(
            N(8), small, f32, v, "sum", 0.1, 1e-4, d, g, weighted=True)))
    for n, D, dtype, variant, inter, ratio, clamp in pcb:
        label = f"{variant} {inter if variant == 'official' else ''} n={N(n)} D={D} {str(dtype)[6:]}".replace("  ", " ")
        out.append((label, lambda d, g, a=(N(n), D, dtype, variant, inter, ratio, clamp): _pcb_matrix(*a, d, g)))
    out.append((f"official state dicts n={N(8)} bf16",
                lambda d, g: _pcb_state_dicts(N(8), [(mid // 1024, 1024), (4095,), (mid // 2 + 3,)], bf16, "official", d, g)))
    out.append((f"paper state dicts n={N(4)} fp32",
                lambda d, g: _pcb_state_dicts(N(4), [(small // 512, 512), (1001,)], f32, "paper", d, g)))
    for variant in ("official", "paper"):  # scope="tensor": every key in the same launches, statistics per key
        out.append((f"{variant} per tensor state dicts n={N(8)} bf16", lambda d, g, v=variant: _pcb_state_dicts(
            N(8), [(mid // 1024, 1024), (4095,), (small // 4 + 3,), (7,), (small, 3)], bf16, v, d, g, "tensor")))
    for method, params in BASELINES:
        out.append((f"{method} {params} n={N(8)} D~{mid}", lambda d, g, method=method, params=params: _baseline(
            N(8), [(mid // 1024, 1024), (777,)], method, params, d, g)))
    out.append((f"ties n={N(64)} D={small}", lambda d, g: _baseline(N(64), [(small,)], "ties", dict(density=0.2), d, g)))
    out.append((f"TIES election with cancellations n=5 D={mid}", lambda d, g: _ties_election(5, mid, d, g)))
    out.append((f"run to run pairwise n={N(8)} D={mid}", lambda d, g: _run_to_run(N(8), mid, d, g)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="small sizes (plumbing only)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
    else:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_check: no CUDA device (run with TRITON_INTERPRET=1 --quick to try the plumbing on a CPU)",
                  file=sys.stderr)
            return 2
        device, name = torch.device("cpu"), "cpu (Triton interpreter)"
    import triton

    import pcb_fast

    machine = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
               "pcb_fast": pcb_fast.__version__}
    print(f"gpu_check on {name} (torch {machine['torch']}, triton {machine['triton']})", flush=True)
    rows, failed = [], 0
    todo = checks(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(done: bool) -> None:
        # after every check: a run stopped by its time limit leaves what it measured
        report = {"machine": machine, "complete": done, "checks_planned": len(todo), "checks": rows}
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(report, indent=1) + "\n")
        partial.replace(args.out)

    write(False)
    for label, fn in todo:
        gen = torch.Generator(device=device).manual_seed(len(rows))
        start = time.perf_counter()
        try:
            result = fn(device, gen)
        except Exception as e:  # noqa: BLE001 - recorded, and the run fails
            result = {"error": f"{type(e).__name__}: {e}", "unexplained": 1}
            traceback.print_exc()
        result = dict(check=label, seconds=round(time.perf_counter() - start, 2), **result)
        ok = result["unexplained"] == 0
        failed += not ok
        rows.append(dict(result, ok=ok))
        print(f"{'ok  ' if ok else 'FAIL'} {label}: " + ", ".join(f"{k}={v}" for k, v in result.items() if k != "check"),
              flush=True)
        write(False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(True)
    print(f"{len(rows) - failed} of {len(rows)} checks passed; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
