//! Image decoding and Qwen2-VL preprocessing into pixel patches.
