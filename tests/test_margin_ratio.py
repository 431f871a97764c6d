"""The seed's Sec. A ratio F(sigma), against the values METHOD.md checked in high precision."""

import decimal

import pytest

from tools.plot_margin_ratio import margin_ratio


def test_ratio_values_and_where_eq10_holds():
    assert margin_ratio(1) == 1
    assert float(margin_ratio(0.5)) == pytest.approx(0.999985, abs=1e-6)
    assert float(margin_ratio(2) - 1) == pytest.approx(5.6e-15, rel=0.01)
    assert margin_ratio(2) > 1 and margin_ratio(1.1) > 1 and margin_ratio(0.9) < 1
    # Increasing (Eq. 9) and tending to 0 as sigma -> -infinity (Eq. 7).
    values = [margin_ratio(s / 4) for s in range(-12, 13)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert margin_ratio(-40) < decimal.Decimal("1e-100")
