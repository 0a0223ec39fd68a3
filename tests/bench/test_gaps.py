"""The swap benchmark's gap arithmetic (bench/load.py), on hand-made completion times."""

from __future__ import annotations

from bench.load import equal_window_gaps, largest_gap


def test_largest_gap_counts_a_stall_across_the_window_edges() -> None:
    done = [0.0, 1.0, 1.5, 4.0, 4.5]
    assert largest_gap(done, 1.2, 3.0) == 2.5  # 1.5 → 4.0 spans the window's end
    assert largest_gap(done, 5.0, 6.0) == 1.5  # no completion inside: edge to edge


def test_steady_windows_are_as_long_as_the_swap_window_and_end_at_the_promotion() -> None:
    # A completion every 0.5 s, with one 2 s stall around t = 3.
    done = [t / 2 for t in range(0, 6)] + [4.5] + [5 + t / 2 for t in range(0, 10)]
    gaps = equal_window_gaps(done, 0.0, 9.0, 3.0)
    assert len(gaps) == 3  # [6, 9], [3, 6], [0, 3]
    assert gaps[0] == 0.5
    assert gaps[1] == 2.0 and gaps[2] == 2.0  # the stall overlaps both windows' edge
    assert equal_window_gaps(done, 0.0, 2.0, 3.0) == []  # no whole window fits
    assert equal_window_gaps(done, 0.0, 9.0, 0.0) == []
