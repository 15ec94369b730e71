"""The ``pcb-fast`` command line: ``demo``, ``merge`` and ``search``.

Exit codes: 0 success; 2 bad arguments, configuration or inputs (found before any heavy work), an
--out that is, holds or lies inside an input, or an output folder that another process created
while the merge ran; 1 a merge that failed while running; 130/143/129 interrupted (SIGINT/SIGTERM/
SIGHUP). Errors are one line on stderr (a traceback only with --verbose), and a merge that does not
finish leaves no output.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from . import __version__
from .core.checks import check_ratio
from .core.options import stderr_bars
from .methods import SPECS, check_method_params, flag_help, flag_params
from .core.checks import short

# Method parameters as flags, from the methods' specs: (flag, keyword, type, declaration, methods taking it).
_TYPES = {"number": float, "int": int}
METHOD_FLAGS = [(f"--{name.replace('_', '-')}", name, _TYPES.get(param.kind, str), param, methods)
                for name, (param, methods) in flag_params().items()]
# Flags that describe a merge, which a --config file replaces.
MERGE_FLAGS = ("base", "model", "method", "lam", "lambdas", "scope", "exclude", "dtype") + tuple(
    f[1] for f in METHOD_FLAGS if f[1] != "compute_dtype")  # (--compute-dtype also applies to a --config)
# --seed is DARE's drop seed in merge and search alike; the search's CMA-ES seed is --search-seed


DEMO_MODELS = 64  # the demo's synthetic models are held in memory, with the reference's copies


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM and SIGHUP handlers, so that a merge cleans up as on Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


# Signals that end a merge cleanly: exit 128 + the signal's number.
TERMINATING = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcb-fast", description="Fast, faithful PCB-Merging and baselines.")
    parser.add_argument("--version", action="version", version=f"pcb_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="merge synthetic fine-tuned models and check against the reference")
    demo.add_argument("--models", type=int, default=8, help="number of fine-tuned models (default 8)")
    demo.add_argument("--ratio", type=float, default=0.1, help="PCB keep ratio, 0 < r <= 1 (default 0.1)")
    demo.add_argument("--no-check", action="store_true", help="skip the comparison with the reference path")

    merge = commands.add_parser("merge", help="merge checkpoints on disk into a Hugging Face folder",
                                description="Merge fine-tuned checkpoints (safetensors files, Hugging Face folders, "
                                            ".bin/.pt) of one base model into a sharded safetensors folder.")
    merge.add_argument("--config", help="a YAML merge configuration (mergekit's format, a subset) instead of the "
                                        "merge flags below")
    _model_flags(merge, [name for name, spec in SPECS.items() if not spec.internal])
    merge.add_argument("--adapter", action="append",
                       help="a PEFT LoRA adapter folder of --base (adapter_config.json, adapter_model.safetensors), "
                            "merged as a model without materialising its delta (repeat for each; instead of --model)")
    merge.add_argument("--out-adapter", type=int, metavar="RANK",
                       help="with --adapter: write --out as a PEFT LoRA adapter of this rank (a truncated SVD of each "
                            "module's merged delta; each module's relative error is reported) instead of a model")
    merge.add_argument("--lambdas", help="per-model weights, comma-separated, one per --model")
    merge.add_argument("--dtype", help="output dtype of floating tensors: float32, float16, bfloat16 (default: "
                                       "the base's)")
    _output_flags(merge)
    merge.add_argument("--backend", default="auto", help="auto (default), torch, triton or reference")
    merge.add_argument("--device", default="cpu", help="cpu (default, streamed from disk) or cuda (loaded whole)")
    merge.add_argument("--max-memory", help="memory the merge may hold beyond the interpreter, torch and 128 MiB "
                                            "of pipeline buffers: cached task vectors and collected entries, e.g. 2GB "
                                            "(default: half the available memory); a smaller budget costs passes, "
                                            "never bits")
    merge.add_argument("--threads", default="auto", type=_threads,
                       help="CPU threads: auto (default: the cores other processes leave free, looked at again "
                            "during the merge) or a number")
    merge.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                       help="fused CPU loops: C loops for ties, dare, dare_ties and pcb's official variant "
                            "(sum, normalized_sum) (the same bits; default auto: always), torch.compile ones for "
                            "breadcrumbs (the same values) and pcb's pairwise term (within 2e-5 of max|tau_m|) "
                            "(auto: from 2^29 task-vector entries, pcb 2^31); off: the eager torch ops")
    merge.add_argument("--distributed", action="store_true",
                       help="run as one rank of a torchrun launch (gloo on CPU): ranks split the output shards")

    search = commands.add_parser("search", help="search per-model lambdas with CMA-ES on your evaluation",
                                 description="Load the models, cache the merge's contributions once, and search one "
                                             "coefficient per model with CMA-ES, maximising a Python function you "
                                             "provide; write the best merged model and the history.")
    _model_flags(search, [name for name, spec in SPECS.items() if spec.searchable])
    search.add_argument("--eval", required=True, dest="evaluate",
                        help="module:function or path/to/file.py:function; called with the merged state dict, "
                             "returns a score (higher is better)")
    search.add_argument("--budget", type=int, default=100, help="number of evaluations (default 100)")
    search.add_argument("--bounds", default="0.8,1.3", help="low,high box bounds of every lambda (default 0.8,1.3)")
    search.add_argument("--x0", type=float, default=1.0, help="starting lambda of every model (default 1.0)")
    search.add_argument("--popsize", type=int, help="CMA-ES population size (default: cma's)")
    search.add_argument("--sigma0", type=float, help="CMA-ES initial step (default: a quarter of the bounds)")
    search.add_argument("--search-seed", dest="search_seed", type=int, default=0, help="CMA-ES seed (default 0)")
    search.add_argument("--history", help="write every evaluation to this .json or .csv file")
    search.add_argument("--threads", default="auto", type=_threads,
                        help="CPU threads: auto (default: the cores other processes leave free) or a number")
    _output_flags(search)
    return parser


def _model_flags(parser, methods: list) -> None:
    """The flags of a merge by one of ``methods`` (the first is the default): models, method, the
    general parameters and every method parameter those methods take."""
    parser.add_argument("--base", help="the base (pre-trained) model")
    parser.add_argument("--model", action="append", help="a fine-tuned model (repeat for each)")
    parser.add_argument("--method", help=f"{methods[0]} (default), {', '.join(methods[1:])}")
    parser.add_argument("--lam", type=float, help="theta = theta_pre + lam * tau_m (default 1.0)")
    parser.add_argument("--scope", help="global (default: statistics over the whole model) or tensor")
    parser.add_argument("--exclude", action="append", help="regex of keys copied from the base (repeatable)")
    for flag, dest, kind, param, takers in METHOD_FLAGS:
        takers = [m for m in takers if m in methods]
        if takers:
            parser.add_argument(flag, dest=dest, type=kind, help=flag_help(dest, takers))


def _threads(text: str):
    """--threads: "auto" or a number of threads from 1 to four per CPU."""
    from .core.threads import max_threads

    if text == "auto":
        return text
    value = int(text) if text.strip().isdigit() and len(text) < 20 else 0
    if not 1 <= value <= max_threads():
        raise argparse.ArgumentTypeError(f"{short(text[:40])} is not 'auto' or a positive number of threads (at most "
                                         f"{max_threads()}, four per CPU of this machine)")
    return value


def _output_flags(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")


def merge_arguments(args) -> dict:
    """Keyword arguments of ``merge_checkpoints`` from the parsed flags (or the --config file)."""
    given = [name for name in MERGE_FLAGS if getattr(args, name) is not None]
    if args.adapter and args.config:
        raise ValueError("--adapter cannot be combined with --config (a config lists models); give --base and --adapter")
    if args.adapter and args.model:
        raise ValueError("--model and --adapter cannot be combined; merge fine-tuned models or LoRA adapters")
    if args.out_adapter is not None and not args.adapter:
        raise ValueError("--out-adapter writes the merge of --adapter folders as an adapter; give --adapter")
    if args.config:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} cannot be combined with --config; put it in the config")
        from .io.config import load_config

        kwargs = load_config(args.config, compute_dtype=getattr(args, "compute_dtype", None))
    else:
        if not args.base:
            raise ValueError("--base is required (or --config)")
        if not args.model and not args.adapter:
            raise ValueError("at least one --model is required")
        from .io.hub import local  # Hub names (org/name[@revision]) through the Hugging Face cache

        base = local(args.base, "--base")
        kwargs = dict(base=base, adapters=args.adapter) if args.adapter else dict(
            base=base, models=[local(m, f"--model {m}") for m in args.model])
        if args.out_adapter is not None:
            kwargs["out_rank"] = args.out_adapter
        if args.method is not None:
            from .io.config import ALIASES

            args.method = ALIASES.get(args.method, args.method)
        if getattr(args, "compute_dtype", None) is not None:  # (mergekit's rule without a config: the inputs' dtype)
            kwargs["compute_dtype"] = "inputs" if args.compute_dtype == "mergekit" else args.compute_dtype
        for name in ("method", "lam", "scope", "exclude", "dtype") + tuple(f[1] for f in METHOD_FLAGS):
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
        if args.lambdas is not None:
            try:
                kwargs["lambdas"] = [float(x) for x in args.lambdas.split(",")]
            except ValueError:
                raise ValueError(f"--lambdas={short(args.lambdas)} must be comma-separated numbers") from None
    kwargs.update(out=args.out, overwrite=args.overwrite, backend=args.backend, device=args.device,
                  max_memory=args.max_memory, shard_size=args.shard_size, distributed=args.distributed, fused=args.fused,
                  threads=args.threads)
    return kwargs


def run_merge(args) -> int:
    from .drivers.files import merge_checkpoints
    from .io.output import MergeFailed, check_not_an_input

    kwargs = merge_arguments(args)  # reads --config: a folder or pipe there is refused as such
    if args.config:  # the config file is an input too (the models are checked by merge_checkpoints)
        check_not_an_input(args.out, [("the config file", args.config)])
    merger = merge_checkpoints
    if "adapters" in kwargs:  # LoRA adapters, merged without materialising their deltas (io/lora.py)
        from .io.folder import check_side_files
        from .drivers.adapters import merge_adapters as merger

        if kwargs.pop("distributed"):
            raise ValueError("--distributed does not merge --adapter folders in this version")
        base = kwargs["base"]
        check_side_files(base if os.path.isdir(base) else None, kwargs.get("dtype"), None)
    report = {}
    try:
        merger(**kwargs, progress=None if args.quiet else stderr_bars, report=report)
    except MergeFailed as e:
        if args.verbose:
            raise
        print(f"pcb-fast: merge failed: {one_line(e)}; no output was written", file=sys.stderr)
        return 1
    if not args.quiet and int(os.environ.get("RANK", "0") if args.distributed else 0) == 0:
        kept = report.get("kept") or []
        entries = report.get("entries") or 0
        fractions = " ".join(f"{k / entries:.4f}" for k in kept) if entries and kept and None not in kept else "n/a"
        print(f"pcb-fast: {kwargs.get('method', 'pcb')}: merged {len(report['merged_keys'])} keys, copied "
              f"{len(report['copied_keys'])}; kept fraction per task {fractions}; {report['seconds']:.1f} s, "
              f"peak memory {report['peak_rss_bytes'] / 2**30:.2f} GiB; wrote {kwargs['out']}", file=sys.stderr)
        if "adapters" in kwargs:
            from .io.lora_out import error_table

            scope = "per-tensor" if kwargs.get("scope") == "tensor" else "global"
            print(f"pcb-fast: {scope} statistics over {report['population']}", file=sys.stderr)
            if "adapter_modules" in report:
                print(error_table(report["adapter_modules"]), file=sys.stderr)
    return 0


def load_evaluate(spec: str):
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    import importlib
    import importlib.util
    from pathlib import Path

    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise ValueError(f"--eval={short(spec)} must be module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"--eval={short(spec)}: no such file {path}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as e:  # the user's module failed to import
        raise ValueError(f"--eval={short(spec)}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"--eval={short(spec)}: {module_name} has no function {short(function)}")
    return fn


def _eval_file(evaluate):
    """The Python file that defines the --eval function, if any."""
    code = getattr(evaluate, "__code__", None)
    return getattr(code, "co_filename", None) if code is not None else None


def run_search(args) -> int:
    from .io.checkpoints import open_checkpoint
    from .io.folder import save_model
    from .io.output import check_file_output, check_not_an_input, check_output, checkpoint_files
    from .io.safetensors import show_path
    from .search import EvaluateError, search_lambdas

    if not args.base or not args.model:
        raise ValueError("--base and at least one --model are required")
    method = args.method or "pcb"
    params = {name: getattr(args, name, None) for name in ("scope", "exclude") + tuple(f[1] for f in METHOD_FLAGS)
              if getattr(args, name, None) is not None}
    lam = 1.0 if args.lam is None else args.lam
    check_method_params(method, len(args.model), lam, None, params.get("scope", "global"),
                        {k: v for k, v in params.items() if k not in ("scope", "exclude")})
    try:
        bounds = tuple(float(x) for x in args.bounds.split(","))
    except ValueError:
        raise ValueError(f"--bounds={short(args.bounds)} must be low,high") from None
    if len(bounds) != 2:
        raise ValueError(f"--bounds={short(args.bounds)} must be low,high")
    inputs = [("the base model", args.base)] + [(f"model {i}", path) for i, path in enumerate(args.model)]
    check_output(args.out, args.overwrite, inputs)
    evaluate = load_evaluate(args.evaluate)
    if _eval_file(evaluate) and os.path.isfile(_eval_file(evaluate)):
        inputs.append(("the --eval file", _eval_file(evaluate)))
    check_not_an_input(args.out, inputs)
    if args.history:  # written after the search: checked as an output now
        check_file_output(args.history, args.overwrite, inputs, [("--out", args.out)])
    base_ck = open_checkpoint(args.base, "base model")
    inputs += checkpoint_files(base_ck, "the base model")
    base = {k: base_ck.read(k) for k in base_ck.keys()}
    base_ck.close()  # read whole: its folder is kept for the side files
    models = []
    for i, path in enumerate(args.model):
        ck = open_checkpoint(path, f"model {i} ({show_path(path)})")
        inputs += checkpoint_files(ck, f"model {i}")
        models.append({k: ck.read(k) for k in ck.keys()})
        ck.close()
    check_not_an_input(args.out, inputs)
    if args.history:
        check_file_output(args.history, args.overwrite, inputs, [("--out", args.out)])
    try:
        result = search_lambdas(base, models, evaluate, bounds=bounds, x0=args.x0, budget=args.budget,
                                popsize=args.popsize, sigma0=args.sigma0, seed=args.search_seed, lam=lam,
                                method=method, history_path=args.history, progress=None if args.quiet else stderr_bars,
                                threads=args.threads, **params)
    except EvaluateError as e:
        if args.verbose:
            raise
        print(f"pcb-fast: search failed: {one_line(e)}; no output was written", file=sys.stderr)
        return 1
    meta = {"merge_method": method, "search": "cma-es", "lambdas": ",".join(f"{x:.6g}" for x in result.lambdas),
            "lam": str(lam), "score": str(result.score)}
    # the card and mergekit_config.yml of a merge with the best lambdas: run again, it gives this model
    merge = dict(base=args.base, models=args.model, method=method, lam=lam, lambdas=list(result.lambdas),
                 scope=params.get("scope", "global"), exclude=params.get("exclude") or (), dtype=None,
                 params={k: v for k, v in params.items() if k not in ("scope", "exclude")})
    save_model(result.model, args.out, base_folder=base_ck.folder, shard_size=args.shard_size,
               overwrite=args.overwrite, metadata=meta, inputs=inputs, merge=merge)
    if not args.quiet:
        print(f"pcb-fast: best score {result.score:.6g} after {len(result.history)} evaluations, lambdas "
              f"{' '.join(f'{x:.4f}' for x in result.lambdas)}; wrote {args.out}", file=sys.stderr)
    return 0


MESSAGE_LIMIT = 1000  # characters of an error line; the messages name values shortened already


def one_line(error: BaseException) -> str:
    """An error's message as one line of bounded length, whatever value it quotes."""
    lines = str(error).splitlines() or [type(error).__name__]
    text = lines[0] + (" ..." if len(lines) > 1 else "")
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 5] + " ..."


def _on_signal(signum, frame):
    raise Terminated(signum)


def _stopped(e: KeyboardInterrupt) -> str:
    """What is left after a merge stopped by a signal: nothing, or (a signal held back while the
    output was published) the complete output."""
    written = getattr(e, "output_written", None)
    return f"the complete output was already written to {written}" if written else "no output was written"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, as the CLI's errors are (no file, line or source)."""
    text = str(message).removeprefix("pcb_fast: ")
    print(f"pcb-fast: warning: {text}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restored on return: an application calling main() keeps its own
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args) -> int:
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            if not 1 <= args.models <= DEMO_MODELS:
                raise ValueError(f"--models={args.models} is out of range; valid: 1 to {DEMO_MODELS} fine-tuned models "
                                 "(each a few MB of synthetic weights)")
            check_ratio(args.ratio)
            return demo_main(n=args.models, ratio=args.ratio, check=not args.no_check)
        # clean up as on Ctrl-C; a signal already ignored (nohup) stays ignored
        previous = {signum: signal.signal(signum, _on_signal) for signum in TERMINATING
                    if signal.getsignal(signum) is not signal.SIG_IGN}
        try:
            return run_merge(args) if args.command == "merge" else run_search(args)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    except ValueError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"pcb-fast: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"pcb-fast: terminated ({signal.Signals(e.signum).name}); {_stopped(e)}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:
        print(f"pcb-fast: interrupted; {_stopped(e)}", file=sys.stderr)
        return 130
    except OSError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"pcb-fast: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
