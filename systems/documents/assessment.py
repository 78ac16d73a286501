"""Timeliness of sign-for (签收及时性), per receiving unit: one of the figures the prefecture
office assesses county offices by (DOMAIN.md, 考核), and one the gateway sees whole, since
every copy's delivery and its 签收 pass through it (``gateway report sign-for``).

A copy counts in the period its delivery fell in (``delivered_at``, as the legacy system or
the next node reported it). Its sign-for time is ``signed_at`` minus ``delivered_at``; a copy
returned (退回) counts as answered but not signed; one still delivered counts as waiting,
aged until now.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import select

from gateway.db import Database
from gateway.models import Delivery, Message
from systems.documents import SLUG


@dataclass
class UnitTimeliness:
    unit: str
    name: str | None
    delivered: int = 0  # copies delivered in the period (whatever became of them after)
    signed: int = 0
    signed_within: int = 0  # signed within the period's limit (``within_hours``)
    returned: int = 0
    waiting: int = 0  # delivered, neither signed nor returned (nor recalled) yet
    median_hours: float | None = None  # delivery to 签收, of the signed copies
    p90_hours: float | None = None
    longest_waiting_hours: float | None = None
    _hours: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("_hours")
        return out


def _rank(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0..1) of ``sorted_values`` (not empty)."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def sign_for(db: Database, start: datetime, end: datetime, within_hours: float, now: datetime) -> list[UnitTimeliness]:
    """Per receiving unit, the copies of documents delivered in [start, end): how many were
    signed, within ``within_hours`` or at all, returned, still waiting, and the median and
    90th percentile of the hours to 签收. Sorted by unit code."""
    q = (select(Delivery.unit, Delivery.unit_name, Delivery.status, Delivery.delivered_at, Delivery.signed_at)
         .join(Message, Message.id == Delivery.message_id)
         .where(Message.subsystem == SLUG, Delivery.delivered_at >= start, Delivery.delivered_at < end)
         .execution_options(yield_per=2000))
    units: dict[str, UnitTimeliness] = {}
    with db.sessions() as s:
        for unit, name, status, delivered_at, signed_at in s.execute(q):
            assert delivered_at is not None  # the query's condition
            u = units.get(unit)
            if u is None:
                u = units[unit] = UnitTimeliness(unit, name)
            u.name = u.name or name
            u.delivered += 1
            if status == "signed" and signed_at is not None:
                hours = max(0.0, (signed_at - delivered_at).total_seconds() / 3600)
                u.signed += 1
                u.signed_within += hours <= within_hours
                u._hours.append(hours)
            elif status == "returned":
                u.returned += 1
            elif status == "delivered":
                u.waiting += 1
                age = (now - delivered_at).total_seconds() / 3600
                u.longest_waiting_hours = max(age, u.longest_waiting_hours or 0.0)
    for u in units.values():
        if u._hours:
            u._hours.sort()
            u.median_hours = round(_rank(u._hours, 0.5), 2)
            u.p90_hours = round(_rank(u._hours, 0.9), 2)
        if u.longest_waiting_hours is not None:
            u.longest_waiting_hours = round(u.longest_waiting_hours, 2)
    return [units[k] for k in sorted(units)]


#: the table's columns: header, and how a row gives its cell
COLUMNS: tuple[tuple[str, str], ...] = (
    ("单位 unit", "unit"), ("名称 name", "name"), ("送达 delivered", "delivered"), ("签收 signed", "signed"),
    ("按时签收 in time", "signed_within"), ("退回 returned", "returned"), ("待签收 waiting", "waiting"),
    ("用时中位 median h", "median_hours"), ("P90 h", "p90_hours"), ("最久待签 oldest h", "longest_waiting_hours"),
)


def table(rows: Iterable[UnitTimeliness]) -> list[list[str]]:
    """The report as text cells, header first."""
    out = [[h for h, _ in COLUMNS]]
    for r in rows:
        out.append(["-" if getattr(r, a) is None else str(getattr(r, a)) for _, a in COLUMNS])
    return out
