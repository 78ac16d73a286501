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


def test_remote_refs_of_a_message_share_a_time_ordered_start():
    """remote_ref: a version 8 UUID, the same for the same message and unit, different per
    unit; every unit of a message shares its first 48 bits (one index neighbourhood for a
    200-unit document), which for a message id the gateway made are that id's time."""
    import time
    import uuid

    from adapters.base import remote_ref
    from gateway.envelope import new_message_id

    units = [f"unit-{i}" for i in range(200)]
    first = new_message_id()
    refs = [remote_ref(first, u) for u in units]
    assert refs == [remote_ref(first, u) for u in units] and len(set(refs)) == 200
    for ref in refs:
        u = uuid.UUID(ref)
        assert (u.version, u.variant, str(u)) == (8, uuid.RFC_4122, ref)
        assert ref[:8] + ref[9:13] == first[:8] + first[9:13]  # the message id's milliseconds
    time.sleep(0.002)
    later = new_message_id()
    assert min(remote_ref(later, u) for u in units) > max(refs)  # a later message sorts after
    node_made = new_message_id("county-a")  # an id this gateway makes: its node id after it
    assert remote_ref(node_made, units[0])[:13] == node_made[:13]  # its time, as for a plain UUIDv7
    own = [remote_ref("州政办发2026-37号-caller-id", u) for u in units]  # not a UUIDv7: a hash of the id
    assert len({r[:13] for r in own}) == 1 and len(set(own)) == 200
    assert own[0][:13] != remote_ref("州政办发2026-38号-caller-id", units[0])[:13]
