"""Quality-target allocation: the smallest plan whose measured perplexity stays within a tolerance."""

from allocator import allocate_to_target, evaluate
from tiny import FAST, lm_batches as batches, tiny_gpt2


def test_smallest_plan_within_the_perplexity_tolerance():
    model = tiny_gpt2()
    held_out = batches(2, seed=7)
    base = evaluate(model, held_out)["perplexity"]
    plan, log = allocate_to_target(model, batches(), held_out, metric="perplexity", tolerance=0.05 * base,
                                   bits=(2, 4, 8), max_evals=12, **FAST)
    measured = evaluate(plan.apply(model), held_out)["perplexity"]
    assert measured <= base * 1.05
    assert plan.solver["target"]["threshold"] == base + 0.05 * base
    assert 1 <= len(log) <= 12
    met = [e for e in log if e["meets"]]
    assert min(e["memory"] for e in met) + plan.predicted["fixed_bytes"] == plan.predicted["total_bytes"]
    assert plan.solver["evaluations"] == log
