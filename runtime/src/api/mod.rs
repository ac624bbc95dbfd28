//! OpenAI-compatible request/response types and the error body.
