"""Unified social credit codes (GB 32100-2015) and their organisation codes (GB 11714)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.units import ALPHABET, make, uscc_problem

SAMPLES = ["11522300GDR9YB9550", "11522300QNNHM83X1E", "1152230107CTPD8U2P", "11522302GRALUMYP76",
           "11522323C4H14TRW96"]
digits_letters = st.text(alphabet="0123456789ABCDEFGHJKLMNPQRTUWXY", min_size=8, max_size=8)


def test_the_sample_units_of_the_legacy_contract_are_valid():
    assert [uscc_problem(c) for c in SAMPLES] == [None] * 5


@given(first8=digits_letters, org8=digits_letters)
def test_made_codes_are_valid(first8, org8):
    assert uscc_problem(make(first8, org8)) is None


@given(first8=digits_letters, org8=digits_letters, pos=st.integers(0, 17), data=st.data())
def test_any_single_character_change_is_detected(first8, org8, pos, data):
    code = make(first8, org8)
    other = data.draw(st.sampled_from([c for c in ALPHABET if c != code[pos]]))
    changed = code[:pos] + other + code[pos + 1:]
    assert uscc_problem(changed) is not None


def test_problems_say_what_is_wrong():
    assert "18 characters" in uscc_problem("1152")
    assert "'I'" in uscc_problem("11522300GDR9YB955I")
    assert "organisation code" in uscc_problem("11522300GDR9YB9650")
    assert "check character" in uscc_problem("11522300GDR9YB9551")
