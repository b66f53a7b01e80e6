"""The bulk call size of a pre-annotation run grows with the run (Label Studio's import recounts
the whole project on each call), within bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.preannotate import AUTO_BATCH_MAX, write_batch_for


@given(configured=st.integers(-5, 20000), a=st.integers(0, 10**7), b=st.integers(0, 10**7))
def test_the_write_batch_grows_with_the_run_within_bounds(configured, a, b):
    small, large = sorted((a, b))
    got_small, got_large = write_batch_for(configured, small), write_batch_for(configured, large)
    assert 1 <= got_small <= got_large  # never less with more tasks
    assert got_small >= configured  # SAM2UNET_WRITE_BATCH is the least
    assert got_large <= max(configured, AUTO_BATCH_MAX)  # and the call stays bounded


def test_measured_sizes():
    assert write_batch_for(500, None) == 500  # the run's size not known yet
    assert write_batch_for(500, 1000) == 500
    assert write_batch_for(500, 10_000) == 2000  # 490 writes/s at 10k, against 145 in 500s
    assert write_batch_for(500, 100_000) == AUTO_BATCH_MAX
