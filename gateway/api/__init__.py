"""HTTP API plumbing: problem+json errors, authentication, the OpenAPI document."""
