"""The inspector draws the plan that ``fk.optimize`` builds from the same rules, whatever their form."""

from __future__ import annotations

import pytest

import flowkit as fk
from flowkit_widgets.inspector import Inspector


def translate(row) -> str:
    return row["s"].upper()


def flow_with_a_high_variance_stage() -> fk.Flow:
    flow = fk.Flow("race", {"s": str})
    flow.map(translate, names=["t"], high_variance=True)
    return flow


@pytest.mark.parametrize("rules, copies", [(dict(compete=True), 2), (dict(compete=False), 1), (dict(compete=12), 12),
                                           (dict(compete=3, fusion=False, max_batch=4), 3)])
def test_the_inspector_plans_exactly_as_fk_optimize_does(rules, copies):
    flow = flow_with_a_high_variance_stage()
    inspector = Inspector(flow, **rules)
    expected = fk.optimize(flow, **rules)
    assert inspector.toggles["compete"].value == copies
    assert inspector.optimized.plan == expected.plan
    assert inspector.optimized.explain() == expected.explain()
