//! The vision tower and image preprocessing.
//!
//! Field paths of the tower's modules equal the checkpoint's key suffixes after
//! `vision_tower.` (mlx-community layout), so the strict loader matches tensors by name.

pub mod bench;
pub mod config;
pub mod merger;
pub mod patch_embed;
pub mod positions;
pub mod preprocess;
pub mod rotary;
pub mod tower;
pub mod vision_block;

pub use config::{VisionActivation, VisionConfig, VisionConfigError};
pub use positions::{mrope_position_ids, rope_delta, PositionError};
pub use tower::{Stage, VisionTower};
pub use vision_block::TowerOptions;
