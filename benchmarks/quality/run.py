"""The merge-quality benchmark: train, merge with every method, tune on validation, report on test.

Rows (docs/design.md 2, 5, 6): pre-trained, individual fine-tuned, average, task arithmetic, TIES,
DARE-TIES, PCB official with each inter term, PCB paper variant, and PCB with per-task lambda_i
from CMA-ES. Every hyperparameter (lam, ratio, density, p, lambda_i) is chosen on the validation
split by grid search or CMA-ES; the test split is used only for the reported numbers.
"""

from __future__ import annotations

import time

import pcb_fast

from . import models as M
from .tasks import PRETRAIN, TASKS, load_splits, task_split

# Gentle fine-tuning (5 epochs of SGD at 0.01): task vectors small next to the weights, as in the
# paper's regime; grids wide enough that every chosen value lies inside them.
FULL = dict(tasks=TASKS, pretrain_epochs=40, epochs=5, lr=0.01,
            lams=(0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8), ta_lams=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
            densities=(0.1, 0.2, 0.3, 0.5), drops=(0.5, 0.7, 0.9), ratios=(0.05, 0.1, 0.2, 0.3, 0.5), cma_budget=100)
SMOKE = dict(tasks=TASKS[:2], pretrain_epochs=5, epochs=2, lr=0.02, lams=(0.6, 1.0), ta_lams=(0.3, 0.6),
             densities=(0.2,), drops=(0.7,), ratios=(0.1,), cma_budget=4)


def train(config: dict, seed: int = 0) -> dict:
    """Splits, the base encoder, the tasks' fixed heads and the fine-tuned encoders."""
    splits = load_splits(seed)
    base, digit_head = M.pretrain(task_split(PRETRAIN, splits["train"]), config["pretrain_epochs"], seed)
    tasks = config["tasks"]
    heads = [M.TaskHead(digit_head, t.labels, t.classes) for t in tasks]
    data = {name: [task_split(t, splits[name]) for t in tasks] for name in ("train", "val", "test")}
    finetuned = [M.finetune(base, h, d, config["epochs"], config["lr"], seed + 1 + i)
                 for i, (h, d) in enumerate(zip(heads, data["train"]))]
    return {"base": base, "heads": heads, "data": data, "finetuned": finetuned}


def _best_on_grid(base, finetuned, val, lams, **params):
    """(score, lam) of the best shared lam on validation, through the cached contributions."""
    result = pcb_fast.grid_search(base, finetuned, val.mean, lams=lams, **params)
    return result.score, result.lam, result.ratio


def run(config: dict = FULL, seed: int = 0, log=print) -> dict:
    """Every row's chosen hyperparameters, validation score and per-task test accuracies."""
    started = time.perf_counter()
    trained = train(config, seed)
    log(f"trained the base and {len(config['tasks'])} fine-tuned encoders in {time.perf_counter() - started:.1f} s")
    base, finetuned, heads = trained["base"], trained["finetuned"], trained["heads"]
    val = M.Evaluator(heads, trained["data"]["val"])
    test = M.Evaluator(heads, trained["data"]["test"])
    rows = []

    def add(name, state, chosen, val_score=None):
        accs = test.accuracies(state)
        rows.append({"row": name, "chosen": chosen, "val": val.mean(state) if val_score is None else val_score,
                     "test": accs})
        log(f"{name:<28} {chosen!s:<46} val {rows[-1]['val']:.4f}  test {sum(accs) / len(accs):.4f}")

    add("pre-trained", base, {})
    individual = [M.Evaluator([h], [d]).accuracies(f)[0]
                  for h, d, f in zip(heads, trained["data"]["test"], finetuned)]
    rows.append({"row": "individual", "chosen": {}, "val": None, "test": individual})
    log(f"{'individual':<28} {'':<46} test {sum(individual) / len(individual):.4f}")
    add("average", pcb_fast.merge(base, finetuned, method="average"), {})

    score, lam, _ = _best_on_grid(base, finetuned, val, config["ta_lams"], method="task_arithmetic")
    add("task arithmetic", pcb_fast.merge(base, finetuned, method="task_arithmetic", lam=lam), {"lam": lam}, score)

    best = max((_best_on_grid(base, finetuned, val, config["lams"], method="ties", density=d) + (d,)
                for d in config["densities"]), key=lambda r: r[0])
    add("TIES", pcb_fast.merge(base, finetuned, method="ties", density=best[3], lam=best[1]),
        {"density": best[3], "lam": best[1]}, best[0])

    candidates = [(val.mean(pcb_fast.merge(base, finetuned, method="dare_ties", p=p, lam=lam)), lam, p)
                  for p in config["drops"] for lam in config["lams"]]
    score, lam, p = max(candidates, key=lambda r: r[0])
    add("DARE-TIES", pcb_fast.merge(base, finetuned, method="dare_ties", p=p, lam=lam), {"p": p, "lam": lam}, score)

    pcb_best = None
    for inter in ("sum", "normalized_sum", "pairwise"):
        score, lam, ratio = _best_on_grid(base, finetuned, val, config["lams"], ratios=config["ratios"],
                                          inter=inter, clamp_ratio=0.01)
        params = dict(inter=inter, ratio=ratio, clamp_ratio=0.01)
        add(f"PCB official, inter={inter}", pcb_fast.merge(base, finetuned, lam=lam, **params),
            {"ratio": ratio, "lam": lam}, score)
        if pcb_best is None or score > pcb_best[0]:
            pcb_best = (score, lam, params)
    score, lam, ratio = _best_on_grid(base, finetuned, val, config["lams"], ratios=config["ratios"], variant="paper")
    add("PCB paper", pcb_fast.merge(base, finetuned, variant="paper", ratio=ratio, lam=lam),
        {"ratio": ratio, "lam": lam}, score)

    _, lam, params = pcb_best
    search = pcb_fast.search_lambdas(base, finetuned, val.mean, lam=lam, budget=config["cma_budget"], seed=seed,
                                     **params)
    add("PCB + CMA-ES lambdas", search.model,
        {"inter": params["inter"], "ratio": params["ratio"], "lam": lam,
         "lambdas": [round(x, 3) for x in search.lambdas]}, search.score)
    return {"tasks": [t.name for t in config["tasks"]], "rows": rows, "seconds": time.perf_counter() - started,
            "parameters": sum(v.numel() for v in base.values())}
