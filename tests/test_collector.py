"""The collector settings of the processes natflow starts itself."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from natflow_engine import tune_collector
from natflow_engine._collector import YOUNG_THRESHOLD


@pytest.fixture
def restored_collector() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_startup_is_frozen_and_young_passes_are_rarer(restored_collector: None) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    tune_collector()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() > 1_000  # the modules and classes imported so far


def test_a_higher_threshold_set_before_is_kept(restored_collector: None) -> None:
    gc.set_threshold(50_000, 5, 5)
    tune_collector()
    assert gc.get_threshold() == (50_000, 5, 5)
