"""`MemoryBudget`: where bytes fit, and which least-recently-used idle models make room."""

from __future__ import annotations

import os

import pytest

from weightsmith_server.errors import ResourceExhausted
from weightsmith_server.models.budget import Held, MemoryBudget, Placement

GPU0, GPU1 = "/device:GPU:0", "/device:GPU:1"


def _budget(*order: str, budgets: dict[str, int] | None = None) -> MemoryBudget:
    budget = MemoryBudget(budgets if budgets is not None else {GPU0: 100})
    for model_id in order:
        budget.touch(model_id)
    return budget


def test_bytes_that_fit_unload_nothing() -> None:
    budget = _budget("a")
    assert budget.plan(60, [GPU0], {GPU0: [Held("a", 40)]}, {"a"}) == Placement(GPU0)


def test_the_least_recently_used_idle_models_go_first_and_only_as_many_as_needed() -> None:
    budget = _budget("a", "b", "c")
    held = {GPU0: [Held("c", 30), Held("a", 30), Held("b", 30)]}
    assert budget.plan(40, [GPU0], held, {"a", "b", "c"}) == Placement(GPU0, ("a",))
    assert budget.plan(50, [GPU0], held, {"a", "b", "c"}) == Placement(GPU0, ("a", "b"))
    budget.touch("a")  # now b, c, a
    assert budget.plan(20, [GPU0], held, {"a", "b", "c"}) == Placement(GPU0, ("b",))


def test_busy_models_are_skipped_and_exhaustion_reports_the_numbers() -> None:
    budget = _budget("a", "b")
    held = {GPU0: [Held("a", 50), Held("b", 40)]}
    assert budget.plan(50, [GPU0], held, {"b"}) == Placement(GPU0, ("b",))
    with pytest.raises(ResourceExhausted) as caught:
        budget.plan(60, [GPU0], held, {"b"})
    assert caught.value.reason == "MEMORY_BUDGET_EXHAUSTED"
    assert caught.value.metadata == {
        "device": GPU0,
        "budget_bytes": "100",
        "needed_bytes": "60",
        "resident_bytes": "90",
    }


def test_more_than_the_whole_budget_is_refused_whatever_is_idle() -> None:
    budget = _budget(budgets={GPU0: 100, GPU1: 120})
    with pytest.raises(ResourceExhausted) as caught:
        budget.plan(121, [GPU0, GPU1], {}, set())
    assert caught.value.reason == "MODEL_EXCEEDS_MEMORY_BUDGET"
    assert caught.value.metadata == {"device": GPU1, "budget_bytes": "120", "needed_bytes": "121"}


def test_pending_placements_count_as_held() -> None:
    budget = _budget("a")
    with pytest.raises(ResourceExhausted):
        budget.plan(50, [GPU0], {GPU0: [Held("a", 30)]}, set(), pending={GPU0: 30})
    assert budget.plan(50, [GPU0], {GPU0: [Held("a", 30)]}, {"a"}, pending={GPU0: 30}) == Placement(
        GPU0, ("a",)
    )


def test_a_device_where_it_fits_wins_over_unloading_and_the_roomiest_is_chosen() -> None:
    budget = _budget("a", "b", budgets={GPU0: 100, GPU1: 100})
    held = {GPU0: [Held("a", 90)], GPU1: [Held("b", 30)]}
    assert budget.plan(50, [GPU0, GPU1], held, {"a", "b"}) == Placement(GPU1)
    assert budget.plan(10, [GPU0, GPU1], held, {"a", "b"}) == Placement(GPU1)
    assert budget.plan(5, [GPU0, GPU1], {}, set()) == Placement(GPU0)  # ties: the first


def test_across_devices_the_plan_unloads_the_oldest_models() -> None:
    budget = _budget("old", "new", budgets={GPU0: 100, GPU1: 100})
    held = {GPU0: [Held("new", 80)], GPU1: [Held("old", 80)]}
    assert budget.plan(50, [GPU0, GPU1], held, {"old", "new"}) == Placement(GPU1, ("old",))


def test_without_unloading_nothing_is_chosen_and_no_budget_means_no_limit() -> None:
    budget = _budget("a")
    with pytest.raises(ResourceExhausted):
        budget.plan(80, [GPU0], {GPU0: [Held("a", 30)]}, {"a"}, unload=False)
    unlimited = _budget(budgets={GPU0: 0})
    assert unlimited.plan(10**15, [GPU0], {GPU0: [Held("a", 10**15)]}, set()) == Placement(GPU0)
    assert unlimited.room(GPU0, 10**15) == float("inf")


def test_forgotten_models_have_no_use() -> None:
    budget = _budget("a", "b")
    assert budget.last_use("a") < budget.last_use("b")
    budget.forget("b")
    assert budget.last_use("b") == 0


def test_automatic_budgets_take_a_share_of_each_device_and_a_configured_one_is_used_as_is() -> None:
    from weightsmith_server.devices import (
        CPU_BUDGET_FRACTION,
        GPU_BUDGET_FRACTION,
        DeviceInfo,
        Devices,
        host_memory_bytes,
    )

    cpu = "/device:CPU:0"
    host = host_memory_bytes()
    assert 0 < host <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    devices = Devices.__new__(Devices)  # not __init__: that would hide the GPUs from this process
    devices.devices = [DeviceInfo(cpu, "CPU", "host CPU", False, memory_total_bytes=host)]
    assert devices.budgets(0) == {cpu: int(host * CPU_BUDGET_FRACTION)}
    assert devices.budgets(5 * 1024 * 1024) == {cpu: 5 * 1024 * 1024}
    devices.devices = [
        DeviceInfo(GPU0, "GPU", "known", True, memory_total_bytes=1000),
        DeviceInfo(GPU1, "GPU", "total unknown", True),
    ]
    assert devices.budgets(0) == {GPU0: int(1000 * GPU_BUDGET_FRACTION), GPU1: 0}
    assert devices.budgets(7) == {GPU0: 7, GPU1: 7}
