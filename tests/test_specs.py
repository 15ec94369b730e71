"""The method specs (pcb_fast.methods.SPECS) are the one declaration every consumer reads."""

import inspect
import re

import pytest
import torch

import pcb_fast
from pcb_fast import reference
from pcb_fast.cli import build_parser
from pcb_fast.core import engine
from pcb_fast.cpu import fused
from pcb_fast.gpu import backend as triton_backend
from pcb_fast.io import card, mergekit_config
from pcb_fast.methods import SPECS, check_method_params, flag_params, spec_of
from pcb_fast.search import SEARCHABLE


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_spec_declares_what_its_merge_function_takes(name):
    spec = SPECS[name]
    signature = inspect.signature(spec.merge).parameters
    internal = ("source", "sink", "options", "lambdas", "block_width", "record", "reuse")  # record, reuse: the search's hooks
    declared = {p: signature[p].default for p in signature if p not in internal}
    assert declared == spec.defaults, f"{name}: the spec's defaults differ from {spec.merge.__name__}'s"
    for param in spec.params:  # each default passes its own check
        assert param.validate(param.default, 3) == param.default
    assert spec.url.startswith("https://") and spec.citation


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_backend_a_spec_names_runs_it(name):
    spec = SPECS[name]
    assert "torch" in spec.backends
    assert ("reference" in spec.backends) == (name == "pcb" or name in reference.BASELINES)
    assert ("triton" in spec.backends) == (name == "pcb" or name in triton_backend.BASELINES)
    assert ("c" in spec.loops) == fused.has_c_loops(name, spec.defaults)  # with its defaults (where C builds)
    assert bool(spec.loops) == (name in fused.FUSED_METHODS)
    assert ("compiled" in spec.loops) == (name in fused.FUSED_METHODS and name not in fused.C_METHODS)


def test_validation_reads_the_spec_and_merges_nothing(monkeypatch):
    def no_merge(*args, **kwargs):
        raise AssertionError("validation ran a merge")

    monkeypatch.setattr(engine, "run", no_merge)
    check_method_params("ties", 2, 1.0, None, "tensor", {"density": [0.5, 0.25], "sign_ties": "positive"})
    check_method_params("breadcrumbs", 1, 1.0, [2.0], "global", {"gamma": 0.1, "beta": 0.5})
    with pytest.raises(ValueError, match=r"density=1.5 is out of range; valid: 0 < density <= 1"):
        check_method_params("ties", 2, 1.0, None, "global", {"density": 1.5})
    with pytest.raises(ValueError, match=r"beta=0.95 is out of range; valid: 0 < beta <= 1 - gamma"):
        check_method_params("breadcrumbs", 2, 1.0, None, "global", {"gamma": 0.1, "beta": 0.95})
    with pytest.raises(ValueError, match=r"p has 3 values but there are 2 models"):
        check_method_params("dare", 2, 1.0, None, "global", {"p": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match=r"seed=\[1, 2\] must be one value"):
        check_method_params("dare", 2, 1.0, None, "global", {"seed": [1, 2]})


def test_an_unknown_parameter_names_the_valid_ones_or_says_there_are_none():
    base = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"method 'average' has no parameter 'normalize'; valid: none \(it takes only "
                                         r"lam and lambdas\)"):
        pcb_fast.merge(base, [base], method="average", normalize=True)
    with pytest.raises(ValueError, match=r"method 'ties' has no parameter 'ratio'; valid: density, sign_ties, topk, "
                                         r"normalize, min_keep"):
        pcb_fast.merge(base, [base], method="ties", ratio=0.5)
    with pytest.raises(ValueError, match=r"method='slurp' is not valid; choose one of 'pcb', 'average'"):
        spec_of("slurp")


def test_a_bad_parameter_is_refused_before_the_data_is_read():
    # a NaN in the base would be reported by the data checks: the parameter comes first
    base = {"w": torch.tensor([float("nan"), 0.0])}
    with pytest.raises(ValueError, match=r"ratio=2.0 is out of range"):
        pcb_fast.merge(base, [{"w": torch.zeros(2)}], method="pcb", ratio=2.0)


def test_the_cli_offers_each_flag_for_the_methods_that_take_it():
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["merge"]._actions}
    search = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["search"]._actions}
    for name, (param, methods) in flag_params().items():
        public = [m for m in methods if not SPECS[m].internal]
        assert name in actions
        for m in public:  # each method with its own meaning of the parameter
            own = next(p for p in SPECS[m].params if p.name == name).help
            assert m in actions[name].help and own in " ".join(actions[name].help.split()), (name, m)
        assert (name in search) == any(m in SEARCHABLE for m in methods), name
    assert "gamma" not in search and "beta" not in search  # Breadcrumbs has no coefficient search
    assert SEARCHABLE == tuple(n for n, s in SPECS.items() if s.searchable)


def test_a_flag_shared_by_methods_gives_each_its_meaning():
    """--t is slerp's interpolation factor and nearswap's similarity threshold: two meanings."""
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    text = next(a for a in merge._actions if a.dest == "t").help
    assert text.startswith("slerp: interpolation factor") and "; nearswap: similarity threshold" in text


def test_the_mergekit_mapping_and_the_card_come_from_the_specs():
    for name, spec in SPECS.items():
        if spec.mergekit:
            assert mergekit_config.MERGEKIT_METHODS[spec.mergekit] == name
            assert set(spec.mergekit_defaults) - {"scope", "density"} <= set(spec.param_names)
            assert card.METHOD_NAMES[spec.mergekit] == (spec.summary, spec.url)
        assert card.METHOD_NAMES[name] == (spec.summary, spec.url)
    assert set(mergekit_config.OWN_METHODS) == {"pcb", "average", "dare"}


def test_an_internal_engine_form_is_no_cli_choice():
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    method = next(a for a in merge._actions if a.dest == "method")
    assert "gta" in SPECS and SPECS["gta"].internal and "gta" not in method.help


def test_the_cli_reference_names_every_method_the_cli_takes():
    """docs/configuration.md's flag table lists the methods `--method` accepts (it once named 8 of 21)."""
    from pathlib import Path

    table = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| `--method NAME`"))
    named = set(re.findall(r"`(\w+)`", row.split("|")[2]))
    assert named == {name for name, spec in SPECS.items() if not spec.internal}
