//! The OpenAI-compatible HTTP API: request/response shapes, errors, routes.

pub mod chat;
pub mod error;
pub mod routes;
pub mod state;
pub mod types;

pub use error::ApiError;
