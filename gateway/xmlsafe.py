"""The one hardened XML parser every module uses.

Every parsing choice that matters for safety lives here, safe by default:

* ``resolve_entities=False`` and a DOCTYPE check: no entity is ever expanded, internal
  or external, so billion-laughs and XXE both fail closed;
* ``no_network=True``: the parser never fetches anything;
* ``load_dtd=False`` and DOCTYPE rejected outright: legacy systems have no business
  sending one, and refusing it is simpler to reason about than tolerating it;
* ``huge_tree=False`` plus our own ``max_bytes`` and ``max_depth`` limits;
* the encoding declared in the prolog is honoured, so GB18030/GBK legacy files decode
  correctly (GB2312 and GBK are read as GB18030, their superset, and GB18030 as its 2022
  edition reads it: :func:`gb18030_decode`).

Nobody builds an ``etree.XMLParser`` by hand elsewhere.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import IO

from lxml import etree

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64

_DECL = re.compile(rb"^\s*<\?xml[^>]*?encoding\s*=\s*['\"]([A-Za-z0-9._-]+)['\"]", re.S)
_DECL_ENC = re.compile(r"^(\s*<\?xml[^>]*?encoding\s*=\s*['\"])[A-Za-z0-9._-]+(['\"])")
_DECL_ENC_B = re.compile(_DECL_ENC.pattern.encode())
#: a JSON text field that XML can carry: no control character but tab and line breaks, no
#: U+FFFE / U+FFFF (JSON refuses lone surrogates itself). A ``pattern`` for pydantic, whose
#: regex engine (pydantic-core's) checks it for next to nothing per accept.
XML_TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\uFFFE\uFFFF]*$"
#: a file name (of a body or attachment): XML_TEXT without / or \, and not . or .. (written
#: without look-ahead, so that pydantic-core runs it in its own engine, not in Python's ``re``:
#: a document names up to 100 files)
_NAME_CHAR = r"[^/\\\x00-\x08\x0b\x0c\x0e-\x1f\uFFFE\uFFFF]"
_NAME_FIRST = r"[^./\\\x00-\x08\x0b\x0c\x0e-\x1f\uFFFE\uFFFF]"
FILE_NAME = rf"^(?:{_NAME_FIRST}{_NAME_CHAR}*|\.{_NAME_FIRST}{_NAME_CHAR}*|\.\.{_NAME_CHAR}+)$"


def plain_json(data: bytes) -> bool:
    """Whether the strings of the JSON text ``data`` (valid JSON: the caller parsed it) are
    plain text for XML: none holds ``&``, ``<``, ``>``, a quotation mark, a control character
    or a surrogate. True when ``data`` has no ``&``, ``<``, ``>`` and no backslash: without a
    backslash there are no escapes, and JSON carries the others only escaped. Two more
    characters XML cannot carry, U+FFFE and U+FFFF, JSON carries as they are: the model that
    reads ``data`` must refuse them (:data:`XML_TEXT`, :data:`FILE_NAME` and every stricter
    form do). Four byte searches (``memchr``), instead of a look at every character of every
    value (see gateway.envelope.Envelope.plain_text)."""
    return not (b"\\" in data or b"&" in data or b"<" in data or b">" in data)


#: names of GB2312, GBK and GB18030 (with their IANA aliases: a Windows system writes
#: windows-936), all read as GB18030, their superset
GB_FAMILY = {"gb2312", "gbk", "gb18030", "cp936", "x-gbk", "euc-cn", "ms936", "windows-936", "csgbk", "csgb2312",
             "gb_2312-80", "csgb18030"}

#: GB18030-2022 maps 18 two-byte codes (ten vertical forms, eight CJK components) to their
#: standard code points; GB18030-2005, and Python's codec, to the Private Use Area. So a
#: 2022 peer's 龴 (FE59) would read as U+E81E, and our U+9FB4 would go out as the 4-byte code
#: a 2022 peer reads as U+E81E: a blank in a name either way. Read both editions' two-byte
#: code as the standard character; write the two-byte code, which both editions (and GBK)
#: take for that character.
_GB2022_PUA = {
    0xFE10: 0xE78D, 0xFE12: 0xE78E, 0xFE11: 0xE78F, 0xFE13: 0xE790, 0xFE14: 0xE791, 0xFE15: 0xE792,
    0xFE16: 0xE793, 0xFE17: 0xE794, 0xFE18: 0xE795, 0xFE19: 0xE796, 0x9FB4: 0xE81E, 0x9FB5: 0xE826,
    0x9FB6: 0xE82B, 0x9FB7: 0xE82C, 0x9FB8: 0xE832, 0x9FB9: 0xE843, 0x9FBA: 0xE854, 0x9FBB: 0xE864,
}
_FROM_PUA = {pua: std for std, pua in _GB2022_PUA.items()}
_ANY_PUA = re.compile("[" + "".join(map(chr, _FROM_PUA)) + "]")
_ANY_MOVED = re.compile("[" + "".join(map(chr, _GB2022_PUA)) + "]")


def gb18030_decode(data: bytes, errors: str = "strict") -> str:
    """``data`` decoded as GB18030 as its 2022 edition reads it (see :data:`_GB2022_PUA`)."""
    text = data.decode("gb18030", errors)
    # a regex search first: str.translate looks at every character of a 64 MB archive
    return text.translate(_FROM_PUA) if _ANY_PUA.search(text) else text


def gb18030_encode(text: str, errors: str = "strict") -> bytes:
    """``text`` in GB18030 as both its 2005 and 2022 editions read it (see :data:`_GB2022_PUA`)."""
    if _ANY_MOVED.search(text):
        text = text.translate(_GB2022_PUA)
    return text.encode("gb18030", errors)


class UnsafeXMLError(ValueError):
    """The document is not acceptable XML; ``reason`` is safe to show to the sender."""

    def __init__(self, reason: str, *, kind: str = "malformed-xml") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class XMLLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    #: libxml2 refuses a single text node over 10 MB unless told otherwise. Archives carry
    #: base64 file contents inline, so their readers opt in; ``max_bytes`` still bounds the
    #: whole document, and entities stay forbidden, so this opens no amplification.
    large_text: bool = False


_per_thread = threading.local()


class _NothingExternal(etree.Resolver):
    """Every external resource a document names (a DTD, an entity) resolves to nothing:
    libxml2 still opens a DOCTYPE's external subset from a local file even with load_dtd off,
    which told a caller whether a file existed. The document is refused afterwards anyway."""

    def resolve(self, system_url, public_id, context):  # type: ignore[no-untyped-def, override]
        return self.resolve_string("", context)


def _parser(large_text: bool = False) -> etree.XMLParser:
    """This thread's parser (an lxml parser may be reused, one document at a time, by the
    thread that made it; building one per document costs a tenth of parsing a small one)."""
    parsers = getattr(_per_thread, "parsers", None)
    if parsers is None:
        parsers = _per_thread.parsers = {}
    parser = parsers.get(large_text)
    if parser is None:
        parser = parsers[large_text] = etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=large_text,
            remove_blank_text=False,
            collect_ids=False,
        )
        parser.resolvers.add(_NothingExternal())
    return parser


_DECLARATION = re.compile(rb"<!(?i:doctype|entity)")


def declared_encoding(data: bytes) -> str | None:
    m = _DECL.match(data[:200])
    return m.group(1).decode("ascii").lower() if m else None


def normalise_gb(data: bytes, charset: str | None = None) -> bytes:
    """libxml2 may lack GB18030 (it depends on the iconv it was built with); decode
    GB-family documents ourselves and hand lxml UTF-8 with the declaration rewritten.
    ``charset``: the encoding the transport declared (HTTP ``Content-Type``), which counts
    when the document declares none (XML 1.0 appendix F: external information first; a
    document without a declaration would otherwise be read as UTF-8)."""
    enc = declared_encoding(data)
    if enc is None and charset is not None and charset.lower() in GB_FAMILY and not data.startswith(b"\xef\xbb\xbf"):
        enc = charset.lower()
    if enc is None or enc not in GB_FAMILY:
        return data
    try:
        text = gb18030_decode(data)
    except UnicodeDecodeError as exc:
        raise UnsafeXMLError(
            f"the document declares encoding {enc} but byte {exc.start} is not valid GB18030",
            kind="bad-encoding",
        ) from None
    text = _DECL_ENC.sub(r"\1UTF-8\2", text, count=1)
    return text.encode("utf-8")


def parse(data: bytes | str, limits: XMLLimits | None = None, charset: str | None = None) -> etree._Element:
    """Parse ``data`` safely and return the root element, or raise :class:`UnsafeXMLError`.
    ``charset``: the encoding the transport declared (HTTP ``Content-Type: …; charset=``),
    which wins over the document's own declaration (RFC 7303, section 3.2)."""
    limits = limits or XMLLimits()
    if isinstance(data, bytes) and charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            data = gb18030_decode(data) if charset.lower() in GB_FAMILY else data.decode(charset)
        except LookupError:
            raise UnsafeXMLError(f"unknown charset {charset!r}; send UTF-8 or GB18030", kind="bad-encoding") from None
        except UnicodeDecodeError as exc:
            raise UnsafeXMLError(f"the body is declared {charset} but byte {exc.start} is not valid {charset}",
                                 kind="bad-encoding") from None
    if isinstance(data, str):
        data = data.encode("utf-8")
        data = _DECL_ENC_B.sub(rb"\1UTF-8\2", data, count=1)
    if len(data) > limits.max_bytes:
        raise UnsafeXMLError(
            f"the document is {len(data)} bytes; at most {limits.max_bytes} are accepted",
            kind="too-large",
        )
    # both declarations start with "<!": most documents have none at all, and are spared
    # two lower-cased copies of themselves
    if b"<!" in data and _DECLARATION.search(data):  # anywhere: after a long comment too
        raise UnsafeXMLError("a DOCTYPE or ENTITY declaration is not allowed", kind="forbidden-dtd")
    data = normalise_gb(data)
    try:
        root = etree.fromstring(data, _parser(limits.large_text))
    except etree.XMLSyntaxError as exc:
        if "Excessive depth" in (exc.msg or ""):  # libxml2's own limit, deeper than ours
            raise UnsafeXMLError(f"elements are nested deeper than {limits.max_depth} levels",
                                 kind="too-deep") from None
        raise UnsafeXMLError(f"not well-formed XML: {exc.msg} (line {exc.lineno})") from None
    if root is None:
        raise UnsafeXMLError("empty document")
    tree = root.getroottree()
    if tree.docinfo.doctype:
        raise UnsafeXMLError("a DOCTYPE declaration is not allowed", kind="forbidden-dtd")
    _check_depth(root, limits.max_depth)
    return root


def parse_legacy(data: bytes | str, limits: XMLLimits | None = None) -> etree._Element:
    """Parse a legacy system's file: XML in GB18030 (shared/legacy/README.md) unless it says
    otherwise. A file that names no encoding (no XML declaration, or ``<?xml version="1.0"?>``)
    and has no byte order mark is read as GB18030 unless its bytes are valid UTF-8 (an XML
    parser alone would take it for UTF-8 and refuse the first Chinese character)."""
    if isinstance(data, bytes) and not data.startswith(_BOMS) and declared_encoding(data) is None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return parse(data, limits, charset="gb18030")
    return parse(data, limits)


_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def parse_stream(stream: IO[bytes], limits: XMLLimits | None = None) -> etree._Element:
    limits = limits or XMLLimits()
    data = stream.read(limits.max_bytes + 1)
    return parse(data, limits)


def _check_depth(root: etree._Element, max_depth: int) -> None:
    # One compiled XPath, evaluated in C: is there an element below max_depth levels?
    if _too_deep(max_depth)(root):
        raise UnsafeXMLError(f"the document nests deeper than {max_depth} levels", kind="too-deep")


def _too_deep(max_depth: int) -> etree.XPath:
    # per thread: an lxml XPath object lets one thread at a time evaluate it
    cache = getattr(_per_thread, "too_deep", None)
    if cache is None:
        cache = _per_thread.too_deep = {}
    xp = cache.get(max_depth)
    if xp is None:
        xp = cache[max_depth] = etree.XPath("boolean(/*" + "/*" * max_depth + ")")
    return xp


def tostring_gb18030(root: etree._Element) -> bytes:
    """Serialise for legacy peers: GB18030 with the matching declaration."""
    text = etree.tostring(root, encoding="unicode")
    return gb18030_encode('<?xml version="1.0" encoding="GB18030"?>\n' + text)


def xslt(path) -> etree.XSLT:
    """Load an XSLT stylesheet from ``schemas/`` with network and file access forbidden
    at transform time (``document()`` can read nothing)."""
    # our own file: read by a parser of its own (the shared ones resolve nothing external,
    # and libxml2 asks the resolver for the file itself)
    doc = etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False))
    ac = etree.XSLTAccessControl.DENY_ALL
    return etree.XSLT(doc, access_control=ac)
