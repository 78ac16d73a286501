"""Unified social credit codes (统一社会信用代码, GB 32100-2015)."""
from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


def check_character(first17: str) -> str:
    total = sum(_VALUE[c] * w for c, w in zip(first17, _WEIGHTS))
    return ALPHABET[(31 - total % 31) % 31]


def uscc_problem(code: object) -> str | None:
    """Why ``code`` is not a valid unified social credit code, or None when it is."""
    if not isinstance(code, str):
        return "expected an 18-character unified social credit code (统一社会信用代码)"
    if len(code) != 18:
        return f"expected 18 characters, got {len(code)}"
    bad = [c for c in code if c not in _VALUE]
    if bad:
        return f"character {bad[0]!r} is not allowed (I, O, S, V and Z are never used)"
    expected = check_character(code[:17])
    if code[17] != expected:
        return f"check character is {code[17]!r} but the first 17 characters give {expected!r}"
    return None


def is_uscc(code: object) -> bool:
    return uscc_problem(code) is None
