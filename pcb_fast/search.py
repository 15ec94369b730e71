"""Coefficient search: cached contributions, CMA-ES over per-task lambda_i, grid search (docs/design.md 6).

The expensive part of a merge (statistics, thresholds, scales) is computed once into a
:class:`ContributionCache`; each candidate lambda then costs one ``apply``, which writes
theta_pre + lam * tau_m(lambda) into the same preallocated state dict, with exactly the rounding
of ``merge(..., lambdas=...)``:
- pcb: per task, the entries with a positive weight and their weighted values w_i tau~_i (sparse,
  about ``ratio`` of each row), and per position the divisor; tau_m = sum_i lambda_i v_i / den;
- task_arithmetic, dare: the (dropped and rescaled) task vectors; tau_m = sum_i lambda_i tau_i;
- ties: the trimmed task vectors; each apply reruns the sign election and the disjoint mean
  (they depend on lambda_i), which costs a few dense operations but no selection.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .api import check_state_dicts
from .core import checks, engine
from .core.formulas import disjoint_mean, elected_signs, zero_sign_fill
from .core.sources import DEFAULT_BLOCK_WIDTH, StateDictSource
from .core.options import PassBars, RunOptions, plan_passes, stderr_bars
from .core.threads import CpuThreads, check_threads
from .io.running_stats import merge_running_stats, running_stat_keys
from .io.tied import check_tied, tied_groups
from .methods import SPECS
from .methods.linear import dare_block, check_drop, check_seed
from .methods.pcb import default_fused
from .methods.ties import SIGN_TIES, TOPK, Trim, check_density

SEARCHABLE = tuple(name for name, spec in SPECS.items() if spec.searchable)
MAX_POPSIZE = 100_000  # candidates per CMA-ES generation; cma holds a few vectors of each


class ContributionCache:
    """A merge computed once for many coefficient vectors: ``apply(lambdas, lam)`` gives the state
    dict of ``merge(base, models, method=..., lambdas=lambdas, lam=lam, ...)``, bit for bit.

    The returned dict is the same object at every call, updated in place (copy what you keep).
    ``reuse``: a dict shared by caches of the same models that differ only in ``ratio`` (pcb), so
    that the statistics independent of ratio are computed once. ``progress``: a bar factory
    ``progress(total_bytes, description)``, one bar per pass of the build (as a merge's).
    """

    @torch.no_grad()  # inputs that require grad are read as data
    def __init__(self, base: dict, models: Sequence[dict], *, method: str = "pcb", scope: str = "global",
                 exclude=(), block_width: int = DEFAULT_BLOCK_WIDTH, reuse: dict | None = None, threads="auto",
                 progress: Callable | None = None, **params):
        if method not in SEARCHABLE:
            raise ValueError(f"method={checks.short(method)} has no per-task coefficients to search; choose one of "
                             f"{', '.join(map(repr, SEARCHABLE))}")
        spec = SPECS[method]
        spec.check_names(params)
        option = spec.engine_only_option(params)
        if option is not None:
            raise ValueError(f"{option} is not supported by the coefficient search, which runs the methods' "
                             f"default options; merge with it instead")
        params = spec.without_engine_options(params)
        checks.check_choice("scope", scope, checks.SCOPE_CHOICES)
        checks.check_block_width(block_width)
        self.threads = check_threads(threads)
        models, names, self.merged, self.copied, device = check_state_dicts(base, models, exclude)
        if device.type != "cpu":
            raise ValueError(f"the contribution cache holds CPU tensors; the models are on {device}")
        self.n = len(models)
        self.method, self.scope, self.params = method, scope, params
        aliases = check_tied(base, models, names, self.merged)  # tied parameters: merged once (io/tied.py)
        # BatchNorm's running statistics: the models' mean weighted by each candidate's lambdas, as merge()
        # takes them (io/running_stats.py); kept here, they are tiny
        self._stat_keys = running_stat_keys(base, self.merged)
        self._stats = ({k: base[k] for k in self._stat_keys}, [{k: m[k] for k in self._stat_keys} for m in models],
                       names)
        merge_running_stats(*self._stats[:2], self._stat_keys, None, "average", names)  # NaN named up front
        self.merged = [k for k in self.merged if k not in aliases and k not in self._stat_keys]
        self.out = {k: base[k].clone() for k in base if k not in aliases}
        for keys in tied_groups({k: base[k] for k in self.copied}):
            self.out.update({k: self.out[keys[0]] for k in keys[1:]})
        self.out.update({alias: self.out[key] for alias, key in aliases.items()})
        self.out = {k: self.out[k] for k in base}
        self._flat_out = {k: self.out[k].view(-1) for k in self.merged}
        # the base as merged_weights adds it: float32, or float64 for a float64 base
        self._base_wide = {k: base[k].reshape(-1).to(torch.promote_types(base[k].dtype, torch.float32))
                           for k in self.merged}
        self._tau = {k: torch.empty(base[k].numel()) for k in self.merged}
        self.source = StateDictSource(base, models, self.merged, names)
        self.reuse = {} if reuse is None else reuse
        # PCB with merge's default: its C sweeps where they build (the same bits)
        fused = default_fused(self.n * self.source.D, params) if method == "pcb" else {}
        with CpuThreads(threads) as cpu_threads:  # as a merge does (core/threads.py)
            options = RunOptions(threads=cpu_threads, progress=progress and PassBars(progress), **fused)
            if method == "pcb":
                self._build_sparse(block_width, options)
            else:
                self._build_dense(block_width, options)

    # ---- building

    def _build_sparse(self, block_width, options):
        parts = {k: ([[] for _ in range(self.n)], [[] for _ in range(self.n)]) for k in self.merged}
        self._den = {k: torch.empty(self.base_numel(k)) for k in self.merged}

        def record(segment, lo, hi, task, pos, value, den):
            positions, values = parts[segment.key]
            counts = torch.bincount(task, minlength=self.n).tolist()
            index = (pos + lo).to(torch.int32 if hi < 2**31 else torch.int64)  # index_add_ takes both
            for i, (p, v) in enumerate(zip(index.split(counts), value.split(counts))):
                if p.numel():
                    positions[i].append(p)
                    values[i].append(v.clone())
            self._den[segment.key][lo:hi] = den

        info = engine.run(SPECS["pcb"].merge, self.source, lambda *a: None, options=options, scope=self.scope,
                          record=record, reuse=self.reuse, block_width=block_width, **self.params)
        self.kept = info["kept"]
        self._entries = {k: [(torch.cat(p) if p else torch.empty(0, dtype=torch.int64),
                              torch.cat(v) if v else torch.empty(0)) for p, v in zip(*parts[k])] for k in self.merged}
        widest = max((v.numel() for k in self.merged for _, v in self._entries[k]), default=0)
        self._scratch = torch.empty(widest)

    def _build_dense(self, block_width, options):
        """[n, numel] float32 per key: the task vectors as the method weights them by lambda_i."""
        src = self.source
        self._vectors = {k: torch.empty(self.n, self.base_numel(k)) for k in self.merged}
        kept = torch.zeros(self.n, dtype=torch.int64)
        if self.method == "ties":
            density = check_density(self.params.get("density", 0.2))
            checks.check_choice("sign_ties", self.params.get("sign_ties", "majority"), SIGN_TIES)
            checks.check_choice("topk", self.params.get("topk", "threshold"), TOPK)
            parts = [src] if self.scope == "global" else [src.restrict(s) for s in src.segments]
            dense = replace(options, memory_budget=0)  # the dense trim: (block, kept mask) per block
            bar = None
            if self.scope == "tensor" and options.progress is not None:  # one bar for the run, as a merge's
                bar = options.progress.tensors(src.D * src.bytes_per_entry(), len(parts))
                dense = replace(dense, progress=None)
            for part in parts:
                width = part.block_width(block_width, dense)
                trim = Trim(part, dense, density, self.params.get("topk", "threshold"), width, sweeps=("cache",))
                for block, mask in trim.dense_blocks():
                    self._vectors[block.segment.key][:, block.lo : block.hi] = block.tv * mask
                    kept += mask.sum(1)
                if bar is not None:
                    bar.update(part.D * part.bytes_per_entry())
            if bar is not None:
                bar.close()
        else:
            plan_passes(options, "cache")
            if self.method == "dare":
                p, seed = check_drop(self.params.get("p", 0.9)), check_seed(self.params.get("seed", 0))
            for block in src.blocks(block_width, options=options):
                engine.raise_if_not_finite(src, options, block, block.tv.abs().amax(1))
                if self.method == "dare":
                    values, mask = dare_block(block, p, seed)
                    kept += mask.sum(1)
                else:
                    values = block.tv
                    kept += block.tv.shape[1]
                self._vectors[block.segment.key][:, block.lo : block.hi] = values
        self.kept = kept.tolist()
        self._scratch = torch.empty(max(self.base_numel(k) for k in self.merged)) if self.merged else None

    def base_numel(self, key: str) -> int:
        return self._base_wide[key].numel()

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds besides the output state dict: contributions, divisors, a float32
        copy of the base where it has another dtype, and the tau_m workspace."""
        total = sum(t.numel() * t.element_size() for k, t in self._base_wide.items()
                    if t.data_ptr() != self.out[k].data_ptr() and t.dtype != self.out[k].dtype)  # float32 copies only
        total += sum(t.numel() * t.element_size() for t in self._tau.values())
        if self.method == "pcb":
            total += sum(t.numel() * 4 for t in self._den.values())
            total += sum(p.numel() * p.element_size() + v.numel() * 4 for k in self.merged for p, v in self._entries[k])
        else:
            total += sum(t.numel() * 4 for t in self._vectors.values())
        return total

    # ---- applying

    @torch.no_grad()
    def apply(self, lambdas=None, lam: float = 1.0) -> dict:
        """theta_pre + lam * tau_m for these per-task coefficients, written into :attr:`out`."""
        lambdas = checks.check_lambdas(lambdas, self.n)
        lam = checks.check_lam(lam)
        with CpuThreads(self.threads):  # the count chosen once per apply (a few large ops)
            return self._apply(lambdas, lam)

    def _apply(self, lambdas, lam) -> dict:
        if self._stat_keys:
            base, models, names = self._stats
            for key, value in merge_running_stats(base, models, self._stat_keys, lambdas, "average", names).items():
                self.out[key].copy_(value)
        if self.method == "ties":
            self._apply_ties(lambdas)
        for key in self.merged:
            tau = self._tau[key]
            if self.method == "pcb":
                tau.zero_()
                for i, (positions, values) in enumerate(self._entries[key]):
                    if positions.numel():
                        weighted = values if lambdas is None else torch.mul(
                            values, lambdas[i], out=self._scratch[: values.numel()])
                        tau.index_add_(0, positions, weighted)
                tau.div_(self._den[key])
            elif self.method != "ties":
                vectors = self._vectors[key]
                # (tau_0 * l_0) + (tau_1 * l_1) + ... in task order, as the merge's sum over tasks
                if lambdas is None:
                    tau.copy_(vectors[0])
                    for row in vectors[1:]:
                        tau.add_(row)
                else:
                    torch.mul(vectors[0], lambdas[0], out=tau)
                    scratch = self._scratch[: tau.numel()]
                    for row, weight in zip(vectors[1:], lambdas[1:]):
                        tau.add_(torch.mul(row, weight, out=scratch))
            base = self._base_wide[key]
            if base.dtype == torch.float32:
                self._flat_out[key].copy_(tau.mul_(lam).add_(base))
            else:  # float64: the sum is taken in float64, as core.formulas.merged_weights does
                torch.add(base, tau.mul_(lam), out=self._flat_out[key])
        return self.out

    def _apply_ties(self, lambdas):
        lam = None if lambdas is None else torch.tensor(lambdas, dtype=torch.float32).unsqueeze(1)
        groups = [self.merged] if self.scope == "global" else [[k] for k in self.merged]
        sign_ties = self.params.get("sign_ties", "majority")
        def chunks(keys):  # column blocks that stay in cache, as the merge's own sweeps
            for k in keys:
                for a in range(0, self._vectors[k].shape[1], DEFAULT_BLOCK_WIDTH):
                    block = self._vectors[k][:, a : a + DEFAULT_BLOCK_WIDTH]
                    yield k, a, block if lam is None else block * lam

        for keys in groups:
            total = sum(int(elected_signs(weighted).sum()) for _, _, weighted in chunks(keys))
            fill = zero_sign_fill(total, sign_ties)
            for k, a, weighted in chunks(keys):
                mean = disjoint_mean(weighted, elected_signs(weighted), fill, lam)
                self._tau[k][a : a + mean.numel()] = mean


# ---- CMA-ES


@dataclass
class SearchResult:
    """The best coefficients found, their score, and every evaluation in order."""

    lambdas: list
    score: float
    lam: float
    history: list = field(default_factory=list)  # dicts: candidate, lambdas, score, seconds
    model: dict | None = None  # the merged state dict of the best lambdas
    ratio: float | None = None  # grid_search over ratios: the best one

    def write_history(self, path) -> None:
        """The history as JSON (.json) or CSV (anything else), written atomically (whole or not at all)."""
        from .io.output import write_file_atomically

        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps({"best": {"lambdas": self.lambdas, "score": self.score, "lam": self.lam},
                               "history": self.history}, indent=2)
        else:
            rows = io.StringIO(newline="")
            writer = csv.writer(rows)
            n = len(self.lambdas)
            writer.writerow(["candidate", "score", "seconds"] + [f"lambda_{i}" for i in range(n)])
            for h in self.history:
                writer.writerow([h["candidate"], h["score"], h["seconds"]] + h["lambdas"])
            text = rows.getvalue()
        write_file_atomically(path, text.encode())


class EvaluateError(RuntimeError):
    """The user's evaluate() failed or returned something that is not a finite number."""


def _evaluate(evaluate: Callable, state: dict, lambdas: list, candidate: int) -> tuple[float, float]:
    start = time.perf_counter()
    try:
        score = evaluate(state)
    except Exception as e:
        raise EvaluateError(f"evaluate raised {type(e).__name__}: {e} (candidate {candidate}, "
                            f"lambdas={[round(x, 6) for x in lambdas]})") from e
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise EvaluateError(f"evaluate returned {checks.short(score)}, not a number (candidate {candidate})") from None
    if not math.isfinite(score):
        raise EvaluateError(f"evaluate returned {score} (candidate {candidate}, lambdas={lambdas}); scores must be finite")
    return score, time.perf_counter() - start


def search_lambdas(base: dict, models: Sequence[dict], evaluate: Callable[[dict], float], *,
                   bounds=(0.8, 1.3), x0=1.0, budget: int = 100, popsize: int | None = None,
                   sigma0: float | None = None, seed: int = 0, lam: float = 1.0, method: str = "pcb",
                   callback: Callable[[dict], bool] | None = None, history_path=None, progress=False,
                   cache: ContributionCache | None = None, **merge_params) -> SearchResult:
    """Per-task lambda_i by CMA-ES (the ``cma`` package) maximising ``evaluate(state_dict)``.

    Defaults follow the authors' vision ES: x0 = 1.0, box bounds [0.8, 1.3], 100 evaluations.
    ``x0`` itself is evaluated first; ``sigma0`` defaults to a quarter of the bounds' width.
    ``callback(entry)`` sees every history entry and may return True to stop. Reproducible for a
    fixed ``seed``. ``merge_params`` (method parameters, scope, exclude) go to the merge; pass a
    ``cache`` to reuse one built earlier. ``progress``: True for bars on stderr
    (core.options.stderr_bars), or a factory ``progress(total, description, unit="B")``: one bar per
    pass of the cache's build, then one over the evaluations (unit "evaluation").
    """
    with warnings.catch_warnings():  # cma warns on import when matplotlib is absent: irrelevant here
        warnings.simplefilter("ignore")
        import cma

    lo, hi = (checks.as_float("bounds", b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds={checks.short(bounds)} must be (low, high) with low < high")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={checks.short(budget)} must be a positive integer (number of evaluations)")
    if history_path is not None:  # checked before the search, not after it
        from .io.output import check_writable_parent

        if Path(history_path).is_dir():
            raise ValueError(f"history_path={checks.short(str(history_path))} is a folder; name a file to write")
        check_writable_parent(history_path, "history_path's folder")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"bounds={checks.short(bounds)} must be finite numbers")
    if popsize is not None and (isinstance(popsize, bool) or not isinstance(popsize, int)
                                or not 2 <= popsize <= MAX_POPSIZE):
        raise ValueError(f"popsize={checks.short(popsize)} is out of range; valid: an integer from 2 to {MAX_POPSIZE}")
    sigma = checks.as_float("sigma0", sigma0) if sigma0 is not None else (hi - lo) / 4
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma0={checks.short(sigma0)} is out of range; valid: a finite number above 0")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32 - 1:
        raise ValueError(f"seed={checks.short(seed)} is out of range; valid: an integer from 0 to {2**32 - 2}")
    if cache is None:
        models = list(models)
    n = cache.n if cache is not None else len(models)
    try:
        start = [float(x0)] * n if isinstance(x0, (int, float)) else [float(x) for x in x0]
    except (TypeError, ValueError):
        start = []
    if len(start) != n or not all(lo <= x <= hi for x in start):
        raise ValueError(f"x0={checks.short(x0)} must be one number or {n} numbers inside bounds [{lo}, {hi}]")
    progress = stderr_bars if progress is True else progress or None
    cache = cache or ContributionCache(base, models, method=method, progress=progress, **merge_params)
    bar = None if progress is None else progress(budget, "search", unit="evaluation")
    history, best = [], None

    def run(candidate_lambdas) -> tuple[float, bool]:
        nonlocal best
        lambdas = [float(x) for x in candidate_lambdas]
        score, seconds = _evaluate(evaluate, cache.apply(lambdas, lam), lambdas, len(history))
        entry = {"candidate": len(history), "lambdas": lambdas, "score": score, "seconds": seconds}
        history.append(entry)
        if best is None or score > best["score"]:
            best = entry
        if bar is not None:
            bar.update(1)
            if hasattr(bar, "set_postfix"):  # (a tqdm bar)
                bar.set_postfix(best=f"{best['score']:.4g}")
        return score, bool(callback(entry)) if callback is not None else False

    try:
        _, stop = run(start)
        options = {"bounds": [lo, hi], "seed": seed + 1, "verbose": -9, "maxfevals": budget}  # cma: seed 0 = random
        if popsize is not None:
            options["popsize"] = popsize
        es = cma.CMAEvolutionStrategy(start, sigma, options) if n > 1 else None
        while not stop and len(history) < budget:
            if es is None:  # one task: CMA-ES needs two dimensions; sample the interval instead
                candidate = lo + (hi - lo) * ((len(history) * 0.6180339887) % 1.0)
                _, stop = run([candidate])
                continue
            if es.stop():
                break
            population = es.ask()
            scores = []
            for x in population:
                if stop or len(history) >= budget:
                    break
                score, stop = run(x)
                scores.append(-score)  # cma minimises
            if len(scores) == len(population):
                es.tell(population, scores)
    finally:
        if bar is not None:
            bar.close()
    result = SearchResult(best["lambdas"], best["score"], lam, history, cache.apply(best["lambdas"], lam))
    if history_path is not None:
        result.write_history(history_path)
    return result


def grid_search(base: dict, models: Sequence[dict], evaluate: Callable[[dict], float], *,
                lams: Sequence[float] = (0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.3), ratios: Sequence[float] | None = None,
                lambdas=None, method: str = "pcb", **merge_params) -> SearchResult:
    """The best shared ``lam`` (and, for pcb, ``ratio``) on a grid, at fixed ``lambdas``. One cache
    per ratio and one apply per lam; the statistics that do not depend on ratio (the |tau| clip
    bounds) are computed once. The result's ``ratio`` is the best ratio (None without a ratio grid)."""
    if ratios is not None and method != "pcb":
        raise ValueError(f"ratios: method {checks.short(method)} has no keep ratio to search (only 'pcb')")
    history, best, best_cache, reuse = [], None, None, {}
    for ratio in (ratios if ratios is not None else [None]):
        params = dict(merge_params) if ratio is None else dict(merge_params, ratio=ratio)
        cache = ContributionCache(base, models, method=method, reuse=reuse, **params)
        fixed = checks.check_lambdas(lambdas, cache.n) or [1.0] * cache.n
        for lam in lams:
            lam = checks.check_lam(lam)
            score, seconds = _evaluate(evaluate, cache.apply(fixed, lam), fixed, len(history))
            entry = {"candidate": len(history), "lam": lam, "ratio": ratio, "lambdas": fixed, "score": score,
                     "seconds": seconds}
            history.append(entry)
            if best is None or score > best["score"]:
                best, best_cache = entry, cache
    model = best_cache.apply(best["lambdas"], best["lam"])
    return SearchResult(best["lambdas"], best["score"], best["lam"], history, model, ratio=best["ratio"])
