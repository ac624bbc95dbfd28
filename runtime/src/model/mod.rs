//! The Qwen3.5/3.6 language model: one file per block.
