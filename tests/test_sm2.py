"""SM2 (国密) node keys and node-to-node signatures (``[federation] algorithm = "sm2"``).

The SM2 signature is the standard one (GB/T 32918.2: ``e = SM3(Z || M)``, Z over the default
ID ``1234567812345678``): checked against the example of GB/T 32918.5-2017 and against an
independent pure-Python implementation (``gmssl``). Then signing and verifying requests with
SM2 and mixed key kinds, the refusals, the key file, the pinned-key parser, and three nodes
as separate processes where county A signs with SM2 and the others with Ed25519."""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec as cec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from adapters.simulators.cluster import CITY_B, COUNTY_A, PREFECTURE, Cluster
from gateway import config as config_mod
from gateway import nodekey
from gateway.federation import keys
from gateway.federation.signing import SignatureRejected, Signer, verify
from gateway.federation.sm2 import SM2PrivateKey, SM2PublicKey
from gateway.models import AuditEntry, Delivery, Message
from tests.test_federation import rows, send, wait_for

# -- the SM2 signature itself -----------------------------------------------------------------
# GB/T 32918.5-2017 Annex A (also GM/T 0003.5-2012): the recommended curve, ID 1234567812345678
KAT_D = 0x3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8
KAT_X = 0x09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020
KAT_Y = 0xCCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13
KAT_MSG = b"message digest"
KAT_R = 0xF5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3
KAT_S = 0xB1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA


def _kat_public() -> SM2PublicKey:
    return SM2PublicKey.from_point(b"\x04" + KAT_X.to_bytes(32, "big") + KAT_Y.to_bytes(32, "big"))


def test_the_standard_example_signature_verifies() -> None:
    """Z with the default ID is part of the signed value: the standard's signature verifies,
    and not over another message."""
    from tongsuopy.crypto.asymciphers import ec

    sig = KAT_R.to_bytes(32, "big") + KAT_S.to_bytes(32, "big")
    _kat_public().verify(sig, KAT_MSG)
    with pytest.raises(InvalidSignature):
        _kat_public().verify(sig, KAT_MSG + b".")
    # the standard's private key gives the standard's public key, and signs what verifies
    priv = SM2PrivateKey(ec.derive_private_key(KAT_D, ec.SM2()))
    assert priv.public_key() == _kat_public()
    _kat_public().verify(priv.sign(KAT_MSG), KAT_MSG)


def _gmssl_key(key: SM2PrivateKey):  # type: ignore[no-untyped-def]
    from gmssl import sm2 as gm

    d = key._key.private_numbers().private_value
    return gm.CryptSM2(private_key="%064x" % d, public_key=key.public_key().point()[1:].hex())


def _usable_by_gmssl() -> SM2PrivateKey:
    # gmssl strips a leading "04" off the public key's hex (lstrip): avoid an x that starts so
    while True:
        key = SM2PrivateKey.generate()
        if not key.public_key().point()[1:].hex().startswith("04"):
            return key


def test_signatures_interoperate_with_an_independent_implementation() -> None:
    """gmssl (pure Python) computes Z with 1234567812345678 in sign_with_sm3/verify_with_sm3."""
    from gmssl import func
    from gmssl import sm2 as gm

    from tongsuopy.crypto.asymciphers import ec

    msg = "州政办发〔2026〕41号 签收回执".encode()
    for _ in range(3):
        key = _usable_by_gmssl()
        gmkey = _gmssl_key(key)
        for _ in range(3):
            assert gmkey.verify_with_sm3(key.sign(msg).hex(), msg)  # ours -> gmssl
            theirs = bytes.fromhex(gmkey.sign_with_sm3(msg, func.random_hex(gmkey.para_len)))
            key.public_key().verify(theirs, msg)  # gmssl -> ours
        assert not gmkey.verify_with_sm3(key.sign(msg).hex(), msg + b"x")
        with pytest.raises(InvalidSignature):
            key.public_key().verify(bytes.fromhex(gmkey.sign_with_sm3(msg + b"x")), msg)
    # a key made by gmssl: its public point, computed there, is the one Tongsuo derives
    d = int(func.random_hex(64), 16) % (2**255) + 1
    point = bytes.fromhex("04" + gm.CryptSM2(private_key="", public_key="")._kg(d, gm.default_ecc_table["g"]))
    assert SM2PublicKey.from_point(point) == SM2PrivateKey(ec.derive_private_key(d, ec.SM2())).public_key()


def test_malformed_sm2_signatures_are_invalid_not_errors() -> None:
    pub = SM2PrivateKey.generate().public_key()
    for sig in (b"", b"\x00" * 64, b"\xff" * 64, b"\x01" * 63, b"\x30\x44" + b"\x01" * 68):
        with pytest.raises(InvalidSignature):
            pub.verify(sig, b"data")


# -- signed requests --------------------------------------------------------------------------
URL = "http://127.0.0.1:8080/federation/v1/status?x=1"
BODY = json.dumps({"items": []}).encode()


def _verify(headers: dict[str, str], pinned: dict[str, keys.PeerKey], body: bytes = BODY,
            url: str = URL) -> str:
    return verify("POST", url, headers, body, keys=pinned.get, max_skew=300).key_id


def _refused(headers: dict[str, str], pinned: dict[str, keys.PeerKey], body: bytes = BODY) -> SignatureRejected:
    with pytest.raises(SignatureRejected) as e:
        _verify(headers, pinned, body)
    return e.value


def test_sm2_signed_requests_verify_and_say_sm2_sm3() -> None:
    key = SM2PrivateKey.generate()
    headers = Signer("county-a", key).sign("POST", URL, {}, BODY)
    assert 'alg="sm2-sm3"' in headers["Signature-Input"]
    assert 'keyid="county-a"' in headers["Signature-Input"]
    raw = headers["Signature"].split("=:", 1)[1].rstrip(":")
    assert len(base64.b64decode(raw)) == 64  # r || s
    assert _verify(headers, {"county-a": key.public_key()}) == "county-a"
    # a GET without a body, too
    get = Signer("county-a", key).sign("GET", URL, {}, None)
    assert verify("GET", URL, get, b"", keys={"county-a": key.public_key()}.get, max_skew=300).key_id == "county-a"


def test_a_mixed_federation_verifies_each_node_by_its_own_key_kind() -> None:
    """A prefecture with an Ed25519 key and a county with SM2 pin each other's key."""
    pref, county = Ed25519PrivateKey.generate(), SM2PrivateKey.generate()
    at_prefecture = {"county-a": keys.parse_public(keys.public_text(county), "x")}
    at_county = {"prefecture": keys.parse_public(keys.public_text(pref), "x")}
    assert keys.public_text(county).startswith("sm2:") and keys.public_text(pref).startswith("ed25519:")
    assert _verify(Signer("county-a", county).sign("POST", URL, {}, BODY), at_prefecture) == "county-a"
    assert _verify(Signer("prefecture", pref).sign("POST", URL, {}, BODY), at_county) == "prefecture"
    # the prefecture's own key kind does not matter: both kinds pinned side by side
    both = {**at_prefecture, "county-b": Ed25519PrivateKey.generate().public_key()}
    assert _verify(Signer("county-a", county).sign("POST", URL, {}, BODY), both) == "county-a"


def test_a_tampered_body_is_refused() -> None:
    key = SM2PrivateKey.generate()
    headers = Signer("county-a", key).sign("POST", URL, {}, BODY)
    e = _refused(headers, {"county-a": key.public_key()}, body=json.dumps({"items": [1]}).encode())
    assert e.kind == "bad-signature" and e.key_id == "county-a"


def test_another_sm2_key_is_refused() -> None:
    headers = Signer("county-a", SM2PrivateKey.generate()).sign("POST", URL, {}, BODY)
    e = _refused(headers, {"county-a": SM2PrivateKey.generate().public_key()})
    assert e.kind == "bad-signature"
    assert "does not verify" in e.detail


@pytest.mark.parametrize("signed_with", ["ed25519", "sm2"])
def test_a_signature_whose_alg_does_not_match_the_pinned_key_is_refused(signed_with: str) -> None:
    key: keys.NodeKey = Ed25519PrivateKey.generate() if signed_with == "ed25519" else SM2PrivateKey.generate()
    pinned: keys.PeerKey = (SM2PrivateKey.generate().public_key() if signed_with == "ed25519"
                            else Ed25519PrivateKey.generate().public_key())
    e = _refused(Signer("county-a", key).sign("POST", URL, {}, BODY), {"county-a": pinned})
    assert e.kind == "bad-signature"
    want = {"ed25519": "alg='ed25519', but the public key pinned for it is sm2 ('sm2-sm3')",
            "sm2": "alg='sm2-sm3', but the public key pinned for it is ed25519 ('ed25519')"}[signed_with]
    assert want in e.detail, e.detail


def test_an_alg_relabelled_to_match_the_pinned_key_is_refused() -> None:
    """An Ed25519 signature relabelled sm2-sm3 (to get past the alg check) fails as SM2."""
    pinned = {"county-a": SM2PrivateKey.generate().public_key()}
    headers = Signer("county-a", Ed25519PrivateKey.generate()).sign("POST", URL, {}, BODY)
    headers["Signature-Input"] = headers["Signature-Input"].replace('alg="ed25519"', 'alg="sm2-sm3"')
    e = _refused(headers, pinned)
    assert e.kind == "bad-signature" and "does not verify" in e.detail
    # and without an alg parameter the pinned key's algorithm decides, and still refuses
    headers["Signature-Input"] = headers["Signature-Input"].replace(';alg="sm2-sm3"', "")
    assert "alg" not in headers["Signature-Input"]
    assert _refused(headers, pinned).kind == "bad-signature"


def test_stale_and_unknown_checks_apply_to_sm2_too() -> None:
    key = SM2PrivateKey.generate()
    old = Signer("county-a", key).sign("POST", URL, {}, BODY,
                                       created=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    assert _refused(old, {"county-a": key.public_key()}).kind == "stale-request"
    assert _refused(Signer("county-x", key).sign("POST", URL, {}, BODY), {"county-a": key.public_key()}).kind \
        == "unknown-key"


# -- the key file -----------------------------------------------------------------------------
def test_the_sm2_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    key = nodekey.load_or_create_sm2(tmp_path)
    path = tmp_path / "node-sm2.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    again = nodekey.load_or_create_sm2(tmp_path)
    assert again.public_key() == key.public_key()
    assert path.read_bytes() == pem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-sm2.pem"]  # no temporary file left
    # the Ed25519 key is another file, untouched by the SM2 one
    ed = nodekey.load_or_create(tmp_path)
    assert isinstance(ed, Ed25519PrivateKey)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-ed25519.pem", "node-sm2.pem"]
    assert nodekey.load_or_create_sm2(tmp_path).public_key() == key.public_key()


@pytest.mark.parametrize("kind", ["sm2", "ed25519"])
def test_keys_created_at_once_are_one_key(tmp_path: Path, kind: str) -> None:
    """Processes starting together never overwrite each other's new key."""
    load = nodekey.load_or_create_sm2 if kind == "sm2" else nodekey.load_or_create
    for attempt in range(5):
        d = tmp_path / str(attempt)
        d.mkdir()
        with ThreadPoolExecutor(8) as pool:
            got = [keys.public_text(k) for k in pool.map(load, [d] * 16)]
        assert set(got) == {keys.public_text(load(d))}
        assert len(list(d.iterdir())) == 1  # the key, no temporary file


def test_a_wrong_key_in_the_sm2_file_is_named(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    (tmp_path / "node-sm2.pem").write_bytes(pem)
    with pytest.raises(ValueError, match="node-sm2.pem is not an SM2 private key"):
        nodekey.load_or_create_sm2(tmp_path)


def test_the_configured_algorithm_chooses_the_node_key(tmp_path: Path) -> None:
    def own(algorithm: str | None) -> keys.NodeKey:
        fed = {"algorithm": algorithm} if algorithm else {}
        cfg = config_mod.from_mapping({"node": {"data_dir": str(tmp_path / "var")}, "federation": fed})
        return keys.own_key(cfg)

    assert isinstance(own(None), Ed25519PrivateKey)
    assert isinstance(own("ed25519"), Ed25519PrivateKey)
    sm2 = own("sm2")
    assert isinstance(sm2, SM2PrivateKey)
    assert (tmp_path / "var" / "node-sm2.pem").exists()
    assert Signer("n", sm2).algorithm.algorithm_id == "sm2-sm3"
    with pytest.raises(config_mod.ConfigError, match="federation.algorithm: 'sm9' is not a supported algorithm"):
        own("sm9")


# -- pinned keys ------------------------------------------------------------------------------
def test_public_text_and_pem_forms_round_trip() -> None:
    key = SM2PrivateKey.generate()
    text = keys.public_text(key)
    raw = base64.b64decode(text.removeprefix("sm2:"))
    assert len(raw) == 65 and raw[0] == 4
    assert keys.public_text(key.public_key()) == text
    assert keys.parse_public(text, "x") == key.public_key()
    assert keys.parse_public(key.public_key().pem(), "x") == key.public_key()
    assert keys.parse_public("\n  " + text + "\n", "x") == key.public_key()
    ed = Ed25519PrivateKey.generate()
    pem = nodekey.public_pem(ed)
    assert keys.public_text(keys.parse_public(pem, "x")) == keys.public_text(ed)


def _peer_error(tmp_path: Path, public_key: str, *, as_file: bool = False) -> str:
    peer: dict[str, object] = {"url": "http://127.0.0.1:9"}
    if as_file:
        (tmp_path / "prefecture.pub").write_text(public_key)
        peer["public_key_file"] = "prefecture.pub"
    else:
        peer["public_key"] = public_key
    with pytest.raises(config_mod.ConfigError) as e:  # the pinned key is parsed when the file is read
        config_mod.from_mapping({"peers": {"prefecture": peer}}, source="node.toml", base_dir=str(tmp_path))
    return str(e.value)


def test_pinned_key_errors_name_the_config_key(tmp_path: Path) -> None:
    where = "node.toml: peers.prefecture.public_key: "
    short = base64.b64encode(SM2PrivateKey.generate().public_key().point()[:33]).decode()
    assert _peer_error(tmp_path, "sm2:" + short).startswith(
        where + "not a valid public key (expected the 65-byte uncompressed point")
    assert _peer_error(tmp_path, "sm2:not base64!").startswith(where + "not a valid public key")
    off_curve = base64.b64encode(b"\x04" + b"\x01" * 64).decode()
    assert _peer_error(tmp_path, "sm2:" + off_curve).startswith(where + "not a valid public key")
    assert _peer_error(tmp_path, "sm9:AAAA").startswith(
        where + "expected PEM text, ed25519:<base64 of the 32 raw bytes> or sm2:<base64")
    p256 = cec.generate_private_key(cec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert _peer_error(tmp_path, p256).startswith(where + "expected an Ed25519 or SM2 public key")
    private = SM2PrivateKey.generate().private_pem().decode()
    assert _peer_error(tmp_path, private).startswith(where + "this is a private key")
    # from a file: the file and the key are named
    msg = _peer_error(tmp_path, "sm2:" + short, as_file=True)
    assert msg.startswith(f"{tmp_path / 'prefecture.pub'} (peers.prefecture.public_key_file): not a valid public key")


# -- three nodes, county A signs with SM2 -----------------------------------------------------
@pytest.fixture(scope="module")
def sm2_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("sm2"),
                overrides={"county-a": {"federation": {"parent": "prefecture", "algorithm": "sm2"}}})
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_the_sm2_county_has_an_sm2_key_pinned_by_the_prefecture(sm2_cluster: Cluster) -> None:
    a = sm2_cluster.nodes["county-a"]
    assert stat.S_IMODE(os.stat(a.data_dir / "node-sm2.pem").st_mode) == 0o600
    assert sm2_cluster.public["county-a"] == keys.public_text(nodekey.load_or_create_sm2(a.data_dir))
    assert sm2_cluster.public["county-a"].startswith("sm2:")
    assert sm2_cluster.public["prefecture"].startswith("ed25519:")
    assert 'algorithm = "sm2"' in a.config_path.read_text()


def test_a_document_reaches_the_sm2_county_and_its_sign_for_comes_back(sm2_cluster: Cluster) -> None:
    pref, a = sm2_cluster.nodes["prefecture"], sm2_cluster.nodes["county-a"]
    mid = send(pref, PREFECTURE, (COUNTY_A,), title="国密联网测试")
    got = wait_for(pref, mid, {COUNTY_A: "signed"})
    assert got[COUNTY_A]["route"] == "county-a"
    assert got[COUNTY_A]["signer"] == "甲县人民政府办公室值班员"
    [(source,)] = rows(a, select(Message.source).where(Message.id == mid))
    assert source == "node:prefecture"


def test_the_sm2_county_sends_through_the_prefecture_to_an_ed25519_county(sm2_cluster: Cluster) -> None:
    pref, a, b = sm2_cluster.nodes["prefecture"], sm2_cluster.nodes["county-a"], sm2_cluster.nodes["county-b"]
    mid = send(a, COUNTY_A, (CITY_B,), title="国密县际转发测试")
    got = wait_for(a, mid, {CITY_B: "signed"})
    assert got[CITY_B]["route"] == "prefecture"
    assert got[CITY_B]["signer"] == "乙市人民政府办公室值班员"
    assert rows(pref, select(Delivery.target, Delivery.status).where(Delivery.message_id == mid)) == [
        ("county-b", "signed")]
    [(source,)] = rows(b, select(Message.source).where(Message.id == mid))
    assert source == "node:prefecture"
    # every node-to-node request so far verified: SM2 from county A, Ed25519 from the others
    for node in (pref, a, b):
        assert rows(node, select(AuditEntry.detail).where(AuditEntry.action == "federation.reject")) == []


def test_the_prefecture_accepts_county_a_only_with_its_sm2_key(sm2_cluster: Cluster) -> None:
    pref, a = sm2_cluster.nodes["prefecture"], sm2_cluster.nodes["county-a"]
    url = f"{pref.url}/federation/v1/ping"
    ok = requests.get(url, headers=Signer("county-a", nodekey.load_or_create_sm2(a.data_dir)).sign(
        "GET", url, {}, None, to="prefecture"), timeout=30)
    assert ok.status_code == 200, ok.text
    assert ok.json()["peer"] == "county-a"
    # county A's Ed25519 key (it has one, for webhooks) is not the key pinned for it
    wrong = requests.get(url, headers=Signer("county-a", nodekey.load_or_create(a.data_dir)).sign(
        "GET", url, {}, None, to="prefecture"), timeout=30)
    assert wrong.status_code == 401
    problem = wrong.json()
    assert problem["type"] == "urn:egov:gateway:problem:bad-signature"
    assert "alg='ed25519'" in problem["detail"] and "sm2" in problem["detail"]


@pytest.mark.parametrize("algorithm", ["ed25519", "sm2"])
def test_a_captured_signature_under_another_label_beside_a_fresh_nonce_is_refused(algorithm: str) -> None:
    """A replay dressed up: the captured signature renamed to another label, beside a 'fed'
    entry with a fresh nonce and a junk signature. The nonce read must be the one verified."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.federation.sm2 import SM2PrivateKey

    key = Ed25519PrivateKey.generate() if algorithm == "ed25519" else SM2PrivateKey.generate()
    pinned = {"county-a": key.public_key()}
    captured = Signer("county-a", key).sign("POST", URL, {}, BODY)
    assert _verify(dict(captured), pinned) == "county-a"
    label_in, label_sig = captured["Signature-Input"], captured["Signature"]
    assert label_in.startswith("fed=") and label_sig.startswith("fed=")
    fresh = label_in.split(";nonce=")[0]
    forged = dict(captured)
    forged["Signature-Input"] = "cap=" + label_in[4:] + ", " + fresh + ';nonce="fresh-nonce";tag="x"'
    forged["Signature"] = "cap=" + label_sig[4:] + ", fed=:AAAA:"
    with pytest.raises(SignatureRejected, match="exactly one signature"):
        _verify(forged, pinned)
    # and a second label beside an intact one is refused too
    extra = dict(captured)
    extra["Signature-Input"] = label_in + ", " + "cap=" + label_in[4:]
    extra["Signature"] = label_sig + ", " + "cap=" + label_sig[4:]
    with pytest.raises(SignatureRejected, match="exactly one signature"):
        _verify(extra, pinned)


@pytest.mark.parametrize("algorithm", ["ed25519", "sm2"])
def test_a_request_signed_for_one_node_is_refused_by_another_that_pins_the_same_key(algorithm: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.federation.sm2 import SM2PrivateKey

    key = Ed25519PrivateKey.generate() if algorithm == "ed25519" else SM2PrivateKey.generate()
    pinned = {"county-a": key.public_key()}
    signed = Signer("county-a", key).sign("POST", URL, {}, BODY, to="prefecture")
    assert verify("POST", URL, signed, BODY, keys=pinned.get, max_skew=300, node_id="prefecture").key_id == "county-a"
    with pytest.raises(SignatureRejected, match="signed for node 'prefecture'"):
        verify("POST", URL, dict(signed), BODY, keys=pinned.get, max_skew=300, node_id="county-b")
    relabelled = {**signed, "Gateway-To": "county-b"}  # the target cannot be changed on the way
    with pytest.raises(SignatureRejected, match="does not verify"):
        verify("POST", URL, relabelled, BODY, keys=pinned.get, max_skew=300, node_id="county-b")
    # an old sender's request names no target: replayable to any node pinning the key, so it
    # is refused unless the node accepts untargeted requests for a while ([federation])
    old = Signer("county-a", key).sign("POST", URL, {}, BODY)
    with pytest.raises(SignatureRejected, match="names no target node"):
        verify("POST", URL, dict(old), BODY, keys=pinned.get, max_skew=300, node_id="prefecture", require_to=True)
    assert verify("POST", URL, dict(old), BODY, keys=pinned.get, max_skew=300, node_id="prefecture",
                  require_to=False).key_id == "county-a"
    # stripping a signed target does not make a request untargeted: the signature breaks
    stripped = {k: v for k, v in signed.items() if k != "Gateway-To"}
    with pytest.raises(SignatureRejected, match="does not verify"):
        verify("POST", URL, stripped, BODY, keys=pinned.get, max_skew=300, node_id="county-b", require_to=False)
