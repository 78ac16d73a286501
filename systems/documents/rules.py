"""Value rules for official documents (党政机关公文处理工作条例, GB/T 9704-2012).

Each check returns a message a clerk can act on: what is wrong and what is expected.
"""
from __future__ import annotations

import re
from datetime import date

DOC_TYPES = ("决议", "决定", "命令", "令", "公报", "公告", "通告", "意见", "通知", "通报", "报告",
             "请示", "批复", "议案", "函", "纪要")
#: 上行文: documents to a superior, which must carry 签发人
UPWARD_TYPES = ("请示", "报告")
CLASSIFICATIONS = ("非密", "秘密", "机密", "绝密")
URGENCIES = ("特急", "加急", "平件")
COPY_TYPES = ("主送", "抄送", "抄报")

# ASCII digits only: \d would take fullwidth ２０２６ too, which the envelope's schema refuses
# used with fullmatch: a $ would let a trailing line break through
_DOC_NUMBER = re.compile(r"(?P<prefix>[^\s〔〕\[\]()（）【】]+)〔(?P<year>[0-9]{4})〕(?P<serial>[0-9]+)号")
_CN_DATE = re.compile(r"([0-9]{4})年([0-9]{1,2})月([0-9]{1,2})日")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
#: the years an official document of this gateway can carry (成文日期, 发文字号)
YEARS = range(1949, 2100)
#: the longest sequence number of a 发文字号 (a unit issues far fewer in a year)
SERIAL_DIGITS = 6


def doc_number_problem(value: str) -> str | None:
    """发文字号 = issuer code + full year in 〔〕 + sequence + 号, e.g. 州政发〔2026〕12号."""
    if any(b in value for b in "[]［］"):
        return "the year must be in hexagonal brackets 〔〕, not square brackets [ ], e.g. 州政发〔2026〕12号"
    if any(b in value for b in "()（）【】"):
        return "the year must be in hexagonal brackets 〔〕, not ( ) or 【】, e.g. 州政发〔2026〕12号"
    if re.search(r"[０-９]", value):
        return "write the year and the sequence number in ASCII digits (0-9), not fullwidth ones, e.g. 州政发〔2026〕12号"
    if "第" in value:
        return "a document number has no 第 before the sequence number, e.g. 州政发〔2026〕12号"
    m = _DOC_NUMBER.fullmatch(value)
    if not m:
        return "expected issuer code + year in 〔〕 + sequence + 号, e.g. 州政发〔2026〕12号"
    if m.group("serial").startswith("0"):
        return f"the sequence number has leading zeros ({m.group('serial')}); write {int(m.group('serial'))}"
    if int(m.group("year")) not in YEARS:
        return f"the year {m.group('year')} is not a plausible year ({YEARS.start}-{YEARS.stop - 1})"
    if len(m.group("serial")) > SERIAL_DIGITS:
        return f"the sequence number has more than {SERIAL_DIGITS} digits"
    return None


def split_doc_number(value: str) -> tuple[str, str, str]:
    m = _DOC_NUMBER.fullmatch(value)
    assert m, value
    return m.group("prefix"), m.group("year"), m.group("serial")


def written_date(value: str) -> tuple[date | None, str | None]:
    """成文日期: ``2026年11月26日`` (no leading zeros) or ISO ``2026-11-26``."""
    m = _CN_DATE.fullmatch(value)
    if m:
        y, mo, d = m.groups()
        if mo.startswith("0") or d.startswith("0"):
            return None, f"month and day take no leading zeros: write {int(y)}年{int(mo)}月{int(d)}日"
        try:
            out = date(int(y), int(mo), int(d))
        except ValueError:
            return None, f"{value} is not a calendar date"
    elif _ISO_DATE.fullmatch(value):  # only this ISO form: fromisoformat alone takes 20261126, 2026-W48-4 …
        try:
            out = date.fromisoformat(value)
        except ValueError:
            return None, f"{value} is not a calendar date"
    else:
        return None, "expected a date like 2026年11月26日 or 2026-11-26"
    if out.year not in YEARS:
        return None, f"the year {out.year} is not a plausible year ({YEARS.start}-{YEARS.stop - 1})"
    return out, None


def copy_no_problem(value: str) -> str | None:
    if not re.fullmatch(r"[0-9]{6}", value) or value == "000000":
        return "份号 is six digits from 000001, e.g. 000001"
    return None
