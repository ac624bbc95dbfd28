//! The vision tower and image preprocessing.

pub mod config;
pub mod preprocess;

pub use config::{VisionActivation, VisionConfig, VisionConfigError};
