"""JSON request and response models of the documents API (validated by pydantic; the
OpenAPI document is generated from them)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import JsonDict
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12

from gateway import xmlsafe
from gateway.envelope import RECEIPT_ACTIONS, URGENCY_RANK
from gateway.models import DELIVERY_STATUSES
from gateway.units import uscc_problem
from systems.documents import rules

Sha256 = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of content uploaded to /api/v1/blobs")
# What the validators below check, told to the OpenAPI document (json_schema_extra only: the
# validators keep their own messages). A check character or a calendar date is beyond a pattern.
_USCC: JsonDict = {"pattern": "^[0-9A-HJ-NPQRTUWXY]{18}$"}
_YEAR = "(?:19(?:49|[5-9][0-9])|20[0-9]{2})"  # rules.YEARS
_DATE: JsonDict = {"pattern": f"^(?:{_YEAR}年(?:[1-9]|1[0-2])月(?:[1-9]|[12][0-9]|3[01])日"
                              f"|{_YEAR}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01]))$"}
_DOC_NUMBER: JsonDict = {"pattern": r"^[^\s\x00-\x1f〔〕\[\]［］()（）【】第０-９\uFFFE\uFFFF]+〔" + _YEAR + r"〕[1-9][0-9]{0,5}号$"}
#: a recipient's status (the list's ?status= takes the same)
RECIPIENT_STATUSES = DELIVERY_STATUSES
#: free text the envelope (XML) can carry (see gateway.xmlsafe.XML_TEXT)
XML_TEXT = xmlsafe.XML_TEXT


def _iso_date(v: str) -> str:
    """A date as a document writes it (2026年11月20日 or 2026-11-20), stored as ISO."""
    d, problem = rules.written_date(v)
    if problem:
        raise ValueError(problem)
    assert d is not None
    return d.isoformat()


# A TypedDict, not a model: a document names up to 100 files, and a dict is cheaper to make
# and to read (the JSON schema is the same). After validation media_type is always there
# (None when not given). Its docstring is the schema's description in the OpenAPI document.
class FileRef(TypedDict):
    """A file (正文 or 附件) uploaded to /api/v1/blobs first, named here by its SHA-256."""
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    sha256: Annotated[str, Sha256]
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=xmlsafe.FILE_NAME,
                               description="file name, e.g. 正文.ofd")]
    media_type: Annotated[str | None, Field(default=None, max_length=100, pattern=XML_TEXT)]


class RecipientIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unit: str = Field(description="统一社会信用代码 of the receiving unit", json_schema_extra=_USCC)
    name: str | None = Field(default=None, max_length=200, pattern=XML_TEXT)
    copy_type: Literal["主送", "抄送", "抄报"] = Field(default="主送", description="主送 / 抄送 / 抄报")
    copy_no: str | None = Field(default=None, description="份号, six digits; a classified document's copies "
                                "are numbered by the gateway when omitted (an unclassified one's only when given)",
                                json_schema_extra={"pattern": "^[0-9]{6}$"})

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        problem = uscc_problem(v)
        if problem:
            raise ValueError(f"not a valid unified social credit code (统一社会信用代码): {problem}")
        return v

    @field_validator("copy_no")
    @classmethod
    def _copy_no(cls, v: str | None) -> str | None:
        if v is not None and (p := rules.copy_no_problem(v)):
            raise ValueError(p)
        return v


class Printer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, pattern=XML_TEXT)
    date: str = Field(description="印发日期, 2026年11月20日 or 2026-11-20", json_schema_extra=_DATE)

    @field_validator("date")
    @classmethod
    def _date(cls, v: str) -> str:
        return _iso_date(v)


class DocumentIn(BaseModel):
    """An official document to send (发文), with its GB/T 9704 elements."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "message_id": None,
        "sender_unit": "11522300GDR9YB9550",
        "issuer": "州人民政府办公室",
        "doc_type": "通知",
        "doc_number": "州政办发〔2026〕37号",
        "title": "关于做好2026年冬季值班和突发事件信息报送工作的通知",
        "classification": "非密",
        "urgency": "加急",
        "signer": "王某某",
        "written_date": "2026年11月20日",
        "recipients": [{"unit": "1152230107CTPD8U2P", "name": "甲县人民政府办公室", "copy_type": "主送"}],
        "body": {"sha256": "038f8adec3132dfe7ebe016fe76c0d31a3125212a287c3b7770beb513e845b99", "name": "正文.ofd"},
    }]})

    message_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{8,128}$",
                                   description="the caller's own id for this message, stored as <id>:<node id> (the answer's "
                                               "id); resending it is idempotent; GET and recall take either form")
    sender_unit: str = Field(description="统一社会信用代码 of the issuing unit (发文机关)", json_schema_extra=_USCC)
    issuer: str = Field(min_length=1, max_length=200, pattern=XML_TEXT, description="发文机关 name")
    doc_type: str = Field(description="文种, one of the 15 types (命令 may be written 令): " + " ".join(rules.DOC_TYPES),
                          json_schema_extra={"enum": list(rules.DOC_TYPES)})
    doc_number: str = Field(pattern=XML_TEXT, description="发文字号, e.g. 州政发〔2026〕12号",
                            json_schema_extra=_DOC_NUMBER)
    title: str = Field(min_length=1, max_length=500, pattern=XML_TEXT, description="标题")
    classification: str = Field(default="非密", description="密级: 非密, 秘密, 机密 or 绝密",
                                json_schema_extra={"enum": list(rules.CLASSIFICATIONS)})
    classification_period: str | None = Field(default=None, max_length=50, validate_default=True, pattern=XML_TEXT,
                                              description="保密期限, required when classified")
    urgency: str = Field(default="平件", description="紧急程度: 特急, 加急 or 平件 (ordinary; 普通 or empty is read as 平件)",
                         json_schema_extra={"enum": [*rules.URGENCIES, "普通", ""]})
    signer: str | None = Field(default=None, min_length=1, max_length=100, validate_default=True, pattern=XML_TEXT,
                               description="签发人, required for 请示 and 报告")
    written_date: str = Field(description="成文日期, 2026年11月20日 or 2026-11-20", json_schema_extra=_DATE)
    recipients: list[RecipientIn] = Field(min_length=1, max_length=1000, description="主送/抄送/抄报 units")
    body: FileRef = Field(description="正文 (OFD or PDF), uploaded first to /api/v1/blobs")
    attachments: list[FileRef] = Field(default_factory=list, max_length=99, description="附件")
    note: str | None = Field(default=None, min_length=1, max_length=2000, pattern=XML_TEXT, description="附注")
    publish_level: str | None = Field(default=None, min_length=1, max_length=20, pattern=XML_TEXT, description="发布层次, e.g. 不公开")
    sealed: bool = True
    printer: Printer | None = Field(default=None, description="印发机关和印发日期")
    conversation_id: str | None = Field(default=None, max_length=128, pattern=XML_TEXT)

    @field_validator("sender_unit")
    @classmethod
    def _sender(cls, v: str) -> str:
        return RecipientIn._unit(v)  # type: ignore[arg-type]

    @field_validator("doc_type")
    @classmethod
    def _doc_type(cls, v: str) -> str:
        if v not in rules.DOC_TYPES:
            raise ValueError(f"{v!r} is not a document type (文种); expected one of {' '.join(rules.DOC_TYPES)}")
        return "命令" if v == "令" else v  # one 文种, 命令（令）: the legacy service knows 命令

    @field_validator("doc_number")
    @classmethod
    def _doc_number(cls, v: str) -> str:
        if p := rules.doc_number_problem(v):
            raise ValueError(p)
        return v

    @field_validator("classification")
    @classmethod
    def _classification(cls, v: str) -> str:
        if v not in rules.CLASSIFICATIONS:
            raise ValueError(f"{v!r} is not a classification (密级); expected 非密, 秘密, 机密 or 绝密")
        return v

    @field_validator("urgency")
    @classmethod
    def _urgency(cls, v: str) -> str:
        if v in ("", "普通", "平件"):
            return "平件"
        if v not in rules.URGENCIES:
            raise ValueError(f"{v!r} is not an urgency (紧急程度); expected 特急, 加急 or 平件 (ordinary)")
        return v

    @field_validator("written_date")
    @classmethod
    def _written_date(cls, v: str) -> str:
        return _iso_date(v)

    # Rules across fields are checked on the field they concern (declared after the fields they
    # read), so that the error names it: classification_period, signer, recipients.
    @field_validator("classification_period")
    @classmethod
    def _period(cls, v: str | None, info: ValidationInfo) -> str | None:
        level = info.data.get("classification")
        if level not in (None, "非密") and not (v and v.strip()):
            raise ValueError(f"a {level} document needs classification_period (保密期限)")
        return v

    @field_validator("signer")
    @classmethod
    def _signer(cls, v: str | None, info: ValidationInfo) -> str | None:
        doc_type = info.data.get("doc_type")
        if doc_type in rules.UPWARD_TYPES and not (v and v.strip()):
            raise ValueError(f"a {doc_type} goes to a superior (上行文) and needs signer (签发人)")
        return v

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, v: list[RecipientIn]) -> list[RecipientIn]:
        seen: set[str] = set()
        numbers: set[str] = set()
        for r in v:
            if r.unit in seen:
                raise ValueError(f"recipient unit {r.unit} is listed twice")
            seen.add(r.unit)
            if r.copy_no is not None:
                if r.copy_no in numbers:
                    raise ValueError(f"份号 {r.copy_no} is given to two recipients; each copy has its own")
                numbers.add(r.copy_no)
        return v

    @field_validator("issuer", "title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("sealed", mode="before")
    @classmethod
    def _strict_bool(cls, v: object) -> object:
        if not isinstance(v, bool):
            raise ValueError("expected true or false")
        return v


# The answers: every field is always sent (null where there is no value), so in the OpenAPI
# document every field is required (json_schema_serialization_defaults_required).
_ANSWER = ConfigDict(json_schema_serialization_defaults_required=True)


class ReceiptOut(BaseModel):
    model_config = _ANSWER
    action: str = Field(json_schema_extra={"enum": list(RECEIPT_ACTIONS)})
    signer: str | None = None
    receipt_no: str | None = None
    reason: str | None = None
    time: datetime | None = None
    source: str


class RecipientStatus(BaseModel):
    model_config = _ANSWER
    unit: str
    name: str | None = None
    copy_type: str | None = Field(default=None, json_schema_extra={"enum": [*rules.COPY_TYPES, None]})
    copy_no: str | None = None
    status: str = Field(description="queued, delivered, signed, returned, recalled or failed",
                        json_schema_extra={"enum": list(RECIPIENT_STATUSES)})
    route: str | None = Field(default=None, description="adapter or node the copy goes through")
    signer: str | None = None
    signed_at: datetime | None = None
    receipt_no: str | None = None
    reason: str | None = None
    last_error: str | None = None
    receipts: list[ReceiptOut] = Field(default_factory=list, description="the copy's receipts, oldest first; "
                                       "empty in the items of a list (GET the document for them)")


class DocumentOut(BaseModel):
    """A document and each recipient's copy (份) with its status."""

    model_config = _ANSWER
    id: str
    status_url: str
    accepted_at: datetime
    sender_unit: str
    doc_number: str | None = None
    title: str | None = None
    doc_type: str | None = None
    classification: str = Field(json_schema_extra={"enum": list(rules.CLASSIFICATIONS)})
    urgency: str = Field(json_schema_extra={"enum": list(URGENCY_RANK)})  # as the envelope may carry it
    recipients: list[RecipientStatus]


class DocumentList(BaseModel):
    """A page of documents, newest first; ``next_cursor`` asks for the next page (null: none)."""

    model_config = _ANSWER
    items: list[DocumentOut]
    next_cursor: str | None = None
