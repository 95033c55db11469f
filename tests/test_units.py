"""Durations and sizes as the reports print them."""

import pytest

from quiesce.util.units import human_bytes, human_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.00039, "0.39 ms"),
        (0.03689, "36.89 ms"),
        (0.6503, "650.3 ms"),
        (2.0101, "2.01 s"),
        (95.4, "95 s"),
    ],
)
def test_durations_keep_the_precision_that_matters_at_their_scale(seconds, text):
    assert human_duration(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "?"), (6, "6 B"), (1536, "1.5 KiB"), (2 << 30, "2.0 GiB"), (3 << 40, "3.0 TiB")],
)
def test_sizes_are_binary_units(n, text):
    assert human_bytes(n) == text
