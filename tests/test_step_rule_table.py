"""The one table of step rules and everything it feeds."""

import subprocess
import sys

import pytest
import torch

from lsdtool import compare, recipes, steprules
from lsdtool.cli import distill, sample
from lsdtool.samplers import Sampler, iterate


def test_the_table_is_torch_free_and_resolves_every_step_function():
    code = "import sys, lsdtool.steprules, lsdtool.grids; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    for rule in steprules.RULES.values():
        assert callable(rule.step_function()) and rule.calls >= 1


def test_every_consumer_offers_the_rules_of_the_table():
    sample_base = next(p for p in sample.params if p.name == "base")
    distill_base = next(p for p in distill.params if p.name == "base")
    assert tuple(sample_base.type.choices) == steprules.NAMES == compare.PLAIN
    assert tuple(distill_base.type.choices) == steprules.DISTILLABLE == recipes.SCHEMA["base"][2]
    assert set(steprules.DISTILLABLE) <= set(steprules.NAMES)


@pytest.mark.parametrize("name", steprules.NAMES)
def test_nfe_and_compare_steps_follow_the_table(name):
    rule = steprules.rule(name)
    if not rule.extra_calls:
        assert Sampler.plain(3, base=name).nfe == 3 * rule.calls + rule.final_calls
    assert compare.steps_for(name, Sampler.plain(4, base=name).nfe) == 4


def test_unknown_rules_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown base 'bogus'"):
        Sampler.plain(2, base="bogus").check()
    with pytest.raises(ValueError, match="unknown base"):
        list(iterate(None, Sampler.plain(2, base="bogus"), torch.arange(1), 0))
