"""Unified social credit codes (统一社会信用代码, GB 32100-2015)."""
from __future__ import annotations

from functools import lru_cache

ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


def check_character(first17: str) -> str:
    total = sum(_VALUE[c] * w for c, w in zip(first17, _WEIGHTS))
    return ALPHABET[(31 - total % 31) % 31]


def org_check_digit(first8: str) -> str:
    """GB 11714 check digit of an organisation code: digits count as 0-9, letters A-Z as 10-35."""
    total = sum((int(c) if c.isdigit() else ord(c) - 55) * w for c, w in zip(first8, _ORG_WEIGHTS))
    v = 11 - total % 11
    return "X" if v == 10 else "0" if v == 11 else str(v)


def make(first8: str, org8: str) -> str:
    """A valid code from the registration authority, administrative division and category
    part (``first8``) and the first 8 characters of the organisation code (tests, demos)."""
    first17 = first8 + org8 + org_check_digit(org8)
    return first17 + check_character(first17)


def uscc_problem(code: object) -> str | None:
    """Why ``code`` is not a valid unified social credit code, or None when it is."""
    if isinstance(code, str) and len(code) == 18:
        return _problem_18(code)  # the same few hundred units recur: remember the verdicts
    return _problem(code)


@lru_cache(maxsize=65536)
def _problem_18(code: str) -> str | None:
    return _problem(code)


def _problem(code: object) -> str | None:
    if not isinstance(code, str):
        return "expected an 18-character unified social credit code (统一社会信用代码)"
    if len(code) != 18:
        return f"expected 18 characters, got {len(code)}"
    bad = [c for c in code if c not in _VALUE]
    if bad:
        return f"character {bad[0]!r} is not allowed (I, O, S, V and Z are never used)"
    org = code[8:17]
    org_expected = org_check_digit(org[:8])
    if org[8] != org_expected:
        return (f"the organisation code {org} (characters 9-17, GB 11714) ends in {org[8]!r} but its "
                f"first 8 characters give {org_expected!r}")
    expected = check_character(code[:17])
    if code[17] != expected:
        return f"check character is {code[17]!r} but the first 17 characters give {expected!r}"
    return None


def is_uscc(code: object) -> bool:
    return uscc_problem(code) is None
