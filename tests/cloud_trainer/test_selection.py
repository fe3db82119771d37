import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_trainer.model.costs import cost_table
from cloud_trainer.model.footprint import part_activations
from cloud_trainer.model.modular import ModularNet, preset
from cloud_trainer.model.selection import Cost, CostTable, SelectionError, select_modules
from device_profiles import Budget, load_profile


def kb(memory_kb: float, latency_ms: float) -> Budget:
    """A budget of ``memory_kb`` KB (the unit of these tables' costs)."""
    return Budget(memory_kb / 1024, latency_ms)


def table(rng, layers=2, modules=4):
    return CostTable(
        Cost(10.0, 0.1),
        tuple(
            tuple(
                Cost(float(rng.uniform(5, 80)), float(rng.uniform(0.05, 1.0)))
                for _ in range(modules)
            )
            for _ in range(layers)
        ),
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(30, 600), st.floats(0.3, 6), st.floats(1.0, 3.0))
def test_selection_fits_and_a_larger_budget_never_lowers_importance(seed, memory, latency, growth):
    rng = np.random.default_rng(seed)
    importance = rng.dirichlet(np.ones(4), size=(2, 10)).transpose(0, 2, 1)
    histogram = rng.integers(0, 20, 10) + 0.0
    histogram[0] += 1
    costs = table(rng)
    small, large = kb(memory, latency), kb(memory * growth, latency * growth)

    try:
        chosen = select_modules(importance, histogram, costs, small)
    except SelectionError:
        return
    bigger = select_modules(importance, histogram, costs, large)

    for s, budget in ((chosen, small), (bigger, large)):
        assert s.cost.memory_kb <= budget.model_memory_kb
        assert s.cost.latency_ms <= budget.latency_ms
        assert all(len(layer) >= 1 for layer in s.modules)
    assert bigger.importance >= chosen.importance - 1e-12


def test_the_best_subset_is_found_exactly():
    importance = np.zeros((1, 3, 2))
    importance[0, :, 0] = [0.5, 0.3, 0.2]
    costs = CostTable(Cost(0, 0), ((Cost(60, 0), Cost(30, 0), Cost(30, 0)),))

    chosen = select_modules(importance, [1, 0], costs, kb(60, 1.0))

    # 0 alone scores 0.5; 1 and 2 together also fit and score 0.5 with the same memory;
    # 0 plus anything does not fit.
    assert chosen.importance == pytest.approx(0.5)
    assert chosen.cost.memory_kb == 60


def test_an_impossible_budget_names_the_smallest_possible_size():
    costs = cost_table(ModularNet(), load_profile("rpi4"))

    with pytest.raises(
        SelectionError, match=r"budget of 0.05 MB .* smallest possible is 0\.2\d\d MB"
    ):
        select_modules(np.ones((2, 4, 10)), np.ones(10), costs, Budget(0.05, 100.0))


@pytest.mark.parametrize("histogram", [np.ones(9), -np.ones(10), np.zeros(10), [np.nan] * 10])
def test_bad_histograms_are_refused(histogram):
    with pytest.raises(SelectionError, match="histogram"):
        select_modules(
            np.ones((2, 4, 10)), histogram, table(np.random.default_rng(0)), kb(10_000, 100.0)
        )


def test_measured_latency_replaces_the_estimate():
    profile = load_profile("rpi4")
    estimated = cost_table(ModularNet(), profile)
    measured = cost_table(ModularNet(), profile, measured_ms={"layer0.block2": 42.0})

    assert measured.modules[0][2].latency_ms == 42.0
    assert measured.modules[0][1] == estimated.modules[0][1]


def test_a_smaller_board_gets_a_smaller_sub_model():
    net = ModularNet(preset("cifar"))
    importance = np.random.default_rng(1).dirichlet(np.ones(4), size=(3, 10)).transpose(0, 2, 1)
    sizes = {}
    for name in ("rpi-zero-2w", "rpi4", "rpi5"):
        profile = load_profile(name)
        sizes[name] = select_modules(
            importance, np.ones(10), cost_table(net, profile), profile.budget
        ).module_count

    # 9.6 MB is far below every board's memory: the Zero's 20 ms is what binds.
    assert sizes["rpi-zero-2w"] < sizes["rpi4"] <= sizes["rpi5"]


def test_a_part_costs_its_program_and_its_largest_activation():
    net = ModularNet()  # 32 channels on 8x8 maps: a block's largest output is 32 x 8 x 8
    block = net.blocks[0][0]
    params = sum(p.numel() for p in block.parameters())

    cost = cost_table(net, load_profile("rpi4")).modules[0][0]
    int8 = cost_table(net, load_profile("rpi4"), quant="int8").modules[0][0]

    assert part_activations(net)["layer0.block0"] == 32 * 8 * 8
    assert cost.memory_kb == pytest.approx(params * 4 / 1024 + 1.0 + 32 * 8 * 8 * 4 / 1024)
    assert int8.memory_kb == pytest.approx(params / 1024 + 1.0 + 32 * 8 * 8 / 1024)


def test_activations_are_measured_at_the_sizes_each_part_sees():
    net = ModularNet(preset("cifar"))  # stride-2 stages: each sees a quarter of the pixels
    acts = part_activations(net)
    spec = net.spec
    first, last = acts["layer0.block0"], acts[f"layer{spec.layers - 1}.block0"]

    assert acts["stem"] > 0 and first > last
    with torch.no_grad():
        x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
        assert acts["stem"] >= net.stem(x).numel()


def test_a_real_board_budget_takes_the_whole_digits_model_unless_latency_binds():
    net = ModularNet()
    importance = np.random.default_rng(2).dirichlet(np.ones(4), size=(2, 10)).transpose(0, 2, 1)
    rpi4 = load_profile("rpi4")
    costs = cost_table(net, rpi4)

    whole = select_modules(importance, np.ones(10), costs, rpi4.budget)
    tight = select_modules(importance, np.ones(10), costs, kb(1e6, whole.cost.latency_ms * 0.7))

    assert whole.module_count == 8 and whole.cost.memory_kb < rpi4.budget.model_memory_kb / 100
    assert tight.module_count < 8 and tight.cost.latency_ms <= whole.cost.latency_ms * 0.7


@pytest.mark.parametrize("seed", range(4))
def test_the_grid_search_fits_and_is_within_its_bound_of_the_exact_search(monkeypatch, seed):
    import cloud_trainer.model.selection as selection

    rng = np.random.default_rng(seed)
    layers, modules = 6, 3
    importance = rng.dirichlet(np.ones(modules), size=(layers, 10)).transpose(0, 2, 1)
    costs = table(rng, layers, modules)
    full = costs.fixed
    for layer in costs.modules:
        for cost in layer:
            full = full + cost
    budget = kb(full.memory_kb * 0.5, full.latency_ms * 0.6)
    shrink = 1 / selection.GRID_PER_LAYER  # of the modules' total costs (the fixed ones aside)
    smaller = kb(
        budget.model_memory_kb - (full.memory_kb - costs.fixed.memory_kb) * shrink,
        budget.latency_ms - (full.latency_ms - costs.fixed.latency_ms) * shrink,
    )
    exact = select_modules(importance, np.ones(10), costs, budget)
    exact_smaller = select_modules(importance, np.ones(10), costs, smaller)
    monkeypatch.setattr(selection, "EXACT_LIMIT", 0)

    grid = select_modules(importance, np.ones(10), costs, budget)

    assert grid.cost.memory_kb <= budget.model_memory_kb
    assert grid.cost.latency_ms <= budget.latency_ms
    assert exact_smaller.importance - 1e-6 <= grid.importance <= exact.importance + 1e-9
    assert grid.importance == pytest.approx(
        float(
            sum(
                importance[layer, list(chosen)].mean(1).sum()
                for layer, chosen in enumerate(grid.modules)
            )
        )
    )
