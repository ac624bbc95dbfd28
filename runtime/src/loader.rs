//! Strict checkpoint loader: mlx-community and Hugging Face layouts, quantized or not.
