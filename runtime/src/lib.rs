//! The cathedral runtime: a Qwen3.5/3.6 (MoE) vision-language model in mlx-rs, served over
//! mTLS with an OpenAI-compatible API.
//!
//! Owns: checkpoint loading (strict), the model forward, generation, tokenisation and image
//! preprocessing, the HTTP/TLS server, the vision gate and kill switch, metrics.
//! Must not: fetch anything from the network at run time, fall back to random weights, or
//! let the vision state change the text path.

pub mod api;
pub mod atomic_file;
pub mod bench;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod killswitch;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod prompt;
pub mod server;
pub mod tiny;
pub mod tokenizer;
pub mod vision;
