//! The inference engine the server drives: load a checkpoint, turn chat messages into a
//! prompt (template, images, token ids), and generate with streaming text deltas.
//!
//! Used from one dedicated thread: MLX state is not shared across threads.
pub mod detok;
pub mod sampling;

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::loader::{load_model, LoadOptions, LoaderError};
use crate::model::{LanguageModel, LayerCache, LogitsScope};
use crate::prompt::{expand_image_pads, ChatMessage, ChatTemplate, ContentPart, PromptError};
use crate::tokenizer::{self, TokenizerError};
use crate::vision::preprocess::{preprocess, ImageError, PixelPatches, PreprocessConfig};
use crate::vision::{mrope_position_ids, VisionTower};

pub use detok::{IncrementalDecoder, StopMatcher, StopScan};
pub use sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Build the vision tower and accept images (when the checkpoint has vision weights).
    pub vision_enabled: bool,
}

/// Whether image inputs can be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionAvailability {
    Ready,
    /// The checkpoint has vision weights but the runtime was started without vision.
    NotWired,
    /// The checkpoint has no vision weights.
    Unsupported,
}

impl std::fmt::Display for VisionAvailability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VisionAvailability::Ready => "the vision pipeline is ready",
            VisionAvailability::NotWired => {
                "the vision pipeline is not wired (the runtime was started without vision)"
            }
            VisionAvailability::Unsupported => "this checkpoint has no vision tower",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoaderError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("the prompt is {tokens} tokens; the model's context is {limit} tokens")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("images are not available: {0}")]
    VisionUnavailable(VisionAvailability),
    #[error("invalid sampling parameters: {0}")]
    InvalidParams(String),
    #[error("model computation failed: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
}

/// A tokenized prompt with its preprocessed images.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    tokens: Vec<u32>,
    images: Vec<PixelPatches>,
}

impl PreparedPrompt {
    pub fn prompt_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn image_count(&self) -> usize {
        self.images.len()
    }
    pub fn token_ids(&self) -> &[u32] {
        &self.tokens
    }
    pub fn images(&self) -> &[PixelPatches] {
        &self.images
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The sink asked to stop (client gone).
    Cancelled,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub vision: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    /// From the start of `generate` to the first sampled token.
    pub first_token: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

pub struct Engine {
    config: ModelConfig,
    model: LanguageModel,
    vision_tower: Option<VisionTower>,
    vision: VisionAvailability,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    preprocess: PreprocessConfig,
    eos: Vec<u32>,
    model_id: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model_id", &self.model_id)
            .field("vision", &self.vision)
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn load(dir: &Path, opts: &EngineOptions) -> Result<Self, EngineError> {
        let started = Instant::now();
        tracing::info!(dir = %dir.display(), vision = opts.vision_enabled, "loading checkpoint");
        let loaded = load_model(
            dir,
            LoadOptions {
                vision: opts.vision_enabled,
            },
        )?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "weights loaded"
        );
        let tokenizer = tokenizer::load(dir)?;
        let template = ChatTemplate::from_checkpoint(dir)?;
        let preprocess = PreprocessConfig::from_checkpoint(dir)?;
        let vision = match (&loaded.vision_tower, loaded.has_vision_weights) {
            (Some(_), _) => VisionAvailability::Ready,
            (None, true) => VisionAvailability::NotWired,
            (None, false) => VisionAvailability::Unsupported,
        };
        let mut eos = loaded.config.eos_token_ids.clone();
        // The chat end marker named by tokenizer_config.json also ends a turn.
        if let Some(id) = eos_from_tokenizer_config(dir).and_then(|t| tokenizer.token_to_id(&t)) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let model_id = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        tracing::info!(
            model_id,
            ?vision,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engine ready"
        );
        Ok(Self {
            config: loaded.config,
            model: loaded.language_model,
            vision_tower: loaded.vision_tower,
            vision,
            tokenizer,
            template,
            preprocess,
            eos,
            model_id,
        })
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn context_length(&self) -> usize {
        self.config.text_config.max_position_embeddings
    }

    pub fn vision(&self) -> VisionAvailability {
        self.vision
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Template → text, images preprocessed, pads expanded, tokenized.
    pub fn prepare(&self, messages: &[ChatMessage]) -> Result<PreparedPrompt, EngineError> {
        let images: Vec<_> = messages
            .iter()
            .flat_map(|m| &m.content)
            .filter_map(|p| match p {
                ContentPart::Image(img) => Some(img),
                ContentPart::Text(_) => None,
            })
            .collect();
        if !images.is_empty() && self.vision != VisionAvailability::Ready {
            return Err(EngineError::VisionUnavailable(self.vision));
        }
        let text = self.template.render(messages, true)?;
        let patches = images
            .iter()
            .map(|img| preprocess(img, &self.preprocess))
            .collect::<Result<Vec<_>, _>>()?;
        let merge = self.preprocess.merge_size;
        let counts: Vec<usize> = patches.iter().map(|p| p.token_count(merge)).collect();
        let text = expand_image_pads(&text, &counts)?;
        let tokens = self.tokenize(&text)?;
        let limit = self.context_length();
        if tokens.len() >= limit {
            return Err(EngineError::PromptTooLong {
                tokens: tokens.len(),
                limit,
            });
        }
        Ok(PreparedPrompt {
            tokens,
            images: patches,
        })
    }

    /// Token ids of `text` (special tokens recognised, nothing added).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Generates a completion, streaming text deltas to `sink`; `Break` from the sink cancels.
    pub fn generate(
        &mut self,
        prompt: &PreparedPrompt,
        params: &SamplingParams,
        sink: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationOutput, EngineError> {
        params.validate().map_err(EngineError::InvalidParams)?;
        let started = Instant::now();
        let mut timings = Timings::default();
        let prompt_len = prompt.tokens.len();
        let budget = params
            .max_tokens
            .min(self.context_length().saturating_sub(prompt_len));

        let (embeds, positions, next_position) = self.prompt_inputs(prompt, &mut timings)?;
        let prefill_start = Instant::now();
        let mut cache = self.model.new_cache();
        let mut logits = self.step(&embeds, &positions, &mut cache)?;
        timings.prefill = prefill_start.elapsed();

        let mut sampler = Sampler::new(params.seed);
        let mut decoder = IncrementalDecoder::default();
        let mut stops = StopMatcher::new(&params.stop);
        let mut text = String::new();
        let mut completion_tokens = 0;
        let mut finish = FinishReason::Length;
        let decode_start = Instant::now();
        let mut emit = |s: &str, text: &mut String| -> ControlFlow<()> {
            if s.is_empty() {
                return ControlFlow::Continue(());
            }
            text.push_str(s);
            sink(s)
        };
        for step in 0..budget {
            let token = sampler.sample(&logits, params);
            completion_tokens += 1;
            if step == 0 {
                timings.first_token = started.elapsed();
            }
            if self.eos.contains(&token) {
                finish = FinishReason::Stop;
                break;
            }
            let delta = decoder
                .push(&self.tokenizer, token)
                .map_err(EngineError::Tokenize)?;
            match stops.push(&delta) {
                StopScan::Emit(s) => {
                    if emit(&s, &mut text).is_break() {
                        finish = FinishReason::Cancelled;
                        break;
                    }
                }
                StopScan::Stopped(s) => {
                    finish = if emit(&s, &mut text).is_break() {
                        FinishReason::Cancelled
                    } else {
                        FinishReason::Stop
                    };
                    break;
                }
            }
            if step + 1 == budget {
                break;
            }
            let ids = Array::from_slice(&[token as i32], &[1, 1]);
            let embeds = self.model.embed(&ids)?;
            let pos = next_position + step as i32;
            let positions = Array::from_slice(&[pos, pos, pos], &[3, 1]);
            logits = self.step(&embeds, &positions, &mut cache)?;
        }
        if finish == FinishReason::Length {
            let rest = stops.flush();
            if emit(&rest, &mut text).is_break() {
                finish = FinishReason::Cancelled;
            }
        }
        timings.decode = decode_start.elapsed();
        tracing::debug!(
            prompt_len,
            completion_tokens,
            ?finish,
            prefill_ms = timings.prefill.as_millis() as u64,
            decode_ms = timings.decode.as_millis() as u64,
            "generation finished"
        );
        Ok(GenerationOutput {
            text,
            prompt_tokens: prompt_len,
            completion_tokens,
            finish_reason: finish,
            timings,
        })
    }

    /// Embeddings `[1, L, hidden]` (image features at the image-pad tokens), positions
    /// `[3, L]`, and the position of the first generated token.
    pub fn prompt_inputs(
        &mut self,
        prompt: &PreparedPrompt,
        timings: &mut Timings,
    ) -> Result<(Array, Array, i32), EngineError> {
        let ids: Vec<i32> = prompt.tokens.iter().map(|&t| t as i32).collect();
        let len = ids.len() as i32;
        let embeds = self.model.embed(&Array::from_slice(&ids, &[1, len]))?;
        if prompt.images.is_empty() {
            let pos: Vec<i32> = (0..3).flat_map(|_| 0..len).collect();
            return Ok((embeds, Array::from_slice(&pos, &[3, len]), len));
        }
        let vision_start = Instant::now();
        let tower = self
            .vision_tower
            .as_ref()
            .ok_or(EngineError::VisionUnavailable(self.vision))?;
        let grids: Vec<[u32; 3]> = prompt.images.iter().map(|p| p.grid_thw).collect();
        let rows: usize = prompt.images.iter().map(|p| p.rows).sum();
        let data: Vec<f32> = prompt
            .images
            .iter()
            .flat_map(|p| p.data.iter().copied())
            .collect();
        let row_len = (data.len() / rows.max(1)) as i32;
        let pixels = Array::from_slice(&data, &[rows as i32, row_len]);
        let features = tower.forward(&pixels, &grids)?.as_dtype(embeds.dtype())?;
        features.eval()?;
        timings.vision = vision_start.elapsed();

        let merge = tower.config().spatial_merge_size;
        let (pos, next) =
            mrope_position_ids(&prompt.tokens, &grids, self.config.image_token_id, merge)
                .map_err(|e| EngineError::Tokenize(e.to_string()))?;
        let embeds = splice_features(
            &embeds,
            &features,
            &prompt.tokens,
            self.config.image_token_id,
        )?;
        let flat: Vec<i32> = (0..3).flat_map(|a| pos.iter().map(move |p| p[a])).collect();
        Ok((embeds, Array::from_slice(&flat, &[3, len]), next))
    }

    /// One forward; returns the last position's logits as f32 on the host.
    fn step(
        &self,
        embeds: &Array,
        positions: &Array,
        cache: &mut [LayerCache],
    ) -> Result<Vec<f32>, EngineError> {
        let logits = self
            .model
            .forward(embeds, positions, cache, LogitsScope::Last)?
            .as_dtype(Dtype::Float32)?;
        let mut arrays: Vec<&Array> = cache.iter().flat_map(LayerCache::arrays).collect();
        arrays.push(&logits);
        mlx_rs::transforms::eval(arrays)?;
        Ok(logits.as_slice::<f32>().to_vec())
    }

    /// Language model and vision tower, for parity tests and benchmarks.
    pub fn parts(&self) -> (&LanguageModel, Option<&VisionTower>) {
        (&self.model, self.vision_tower.as_ref())
    }
}

/// Replaces the embeddings of the image-pad tokens, in order, by the rows of `features`.
pub fn splice_features(
    embeds: &Array,
    features: &Array,
    tokens: &[u32],
    image_token_id: u32,
) -> Result<Array, EngineError> {
    let mut pieces = Vec::new();
    let mut feature_row = 0i32;
    let mut i = 0usize;
    while i < tokens.len() {
        let is_image = tokens[i] == image_token_id;
        let start = i;
        while i < tokens.len() && (tokens[i] == image_token_id) == is_image {
            i += 1;
        }
        let (a, b) = (start as i32, i as i32);
        if is_image {
            let n = b - a;
            pieces.push(
                features
                    .index(feature_row..feature_row + n)
                    .expand_dims(0)?,
            );
            feature_row += n;
        } else {
            pieces.push(embeds.index((.., a..b, ..)));
        }
    }
    if feature_row != features.shape()[0] {
        return Err(EngineError::Tokenize(format!(
            "{} image tokens for {} image features",
            feature_row,
            features.shape()[0]
        )));
    }
    Ok(mlx_rs::ops::concatenate(&pieces, 1)?)
}

fn eos_from_tokenizer_config(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    match v.get("eos_token")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}
