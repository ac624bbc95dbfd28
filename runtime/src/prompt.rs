//! Chat prompts: the checkpoint chat template, image placeholders.
