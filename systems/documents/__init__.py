"""电子公文传输 electronic official-document transmission (slug ``documents``)."""
SLUG = "documents"
PAYLOAD_NS = "urn:egov:gateway:documents:v1"
