//! The inference engine the server drives: load a checkpoint, turn chat messages into a
//! prompt (template, images, token ids), and generate with streaming text deltas.
//!
//! Used from one dedicated thread: MLX state is not shared across threads.
pub mod detok;
pub mod feature_cache;
pub mod sampling;

use std::cell::RefCell;
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
use feature_cache::{CachedFeatures, FeatureCache, ImageDigest};

pub use detok::{IncrementalDecoder, StopMatcher, StopScan};
pub use sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Build the vision tower and accept images (when the checkpoint has vision weights).
    pub vision_enabled: bool,
    /// Bytes of vision features kept for images seen again; 0 turns the cache off.
    pub vision_cache_bytes: usize,
}

/// Default [`EngineOptions::vision_cache_bytes`]: 256 MiB, some 64 full-size images of the
/// 35B checkpoint (1,024 tokens × 2,048 × bf16 each).
pub const DEFAULT_VISION_CACHE_BYTES: usize = 256 << 20;

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            vision_enabled: false,
            vision_cache_bytes: DEFAULT_VISION_CACHE_BYTES,
        }
    }
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

/// Whether a prompt may take image features from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeatureReuse {
    #[default]
    Allow,
    /// Run the tower even for an image seen before (a canary probe must exercise it); the
    /// fresh features replace the cached ones.
    Recompute,
}

/// One image of a prompt: its pixels, or its features when the cache already had them.
#[derive(Debug, Clone)]
pub struct PromptImage {
    /// `None` when the cache is off: no hashing for nothing.
    digest: Option<ImageDigest>,
    grid_thw: [u32; 3],
    input: ImageInput,
}

#[derive(Debug, Clone)]
enum ImageInput {
    Pixels(PixelPatches),
    Features(Array),
}

/// A tokenized prompt with its preprocessed images.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    tokens: Vec<u32>,
    images: Vec<PromptImage>,
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
    /// Preprocessed pixels of the images the feature cache did not have.
    pub fn pixels(&self) -> impl Iterator<Item = &PixelPatches> {
        self.images.iter().filter_map(|i| match &i.input {
            ImageInput::Pixels(p) => Some(p),
            ImageInput::Features(_) => None,
        })
    }
    /// Images whose features came from the cache.
    pub fn cached_images(&self) -> usize {
        self.images.len() - self.pixels().count()
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
    /// The sampled ids, EOS included when it ended the generation.
    pub tokens: Vec<u32>,
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
    features: RefCell<FeatureCache>,
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
            features: RefCell::new(FeatureCache::new(opts.vision_cache_bytes)),
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

    /// Template → text, images preprocessed (or their features taken from the cache), pads
    /// expanded, tokenized.
    pub fn prepare(&self, messages: &[ChatMessage]) -> Result<PreparedPrompt, EngineError> {
        self.prepare_with(messages, FeatureReuse::Allow)
    }

    /// [`Engine::prepare`], choosing whether cached image features may be used.
    pub fn prepare_with(
        &self,
        messages: &[ChatMessage],
        reuse: FeatureReuse,
    ) -> Result<PreparedPrompt, EngineError> {
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
        let merge = self.preprocess.merge_size;
        let mut prompt_images = Vec::with_capacity(images.len());
        let mut counts = Vec::with_capacity(images.len());
        for img in images {
            let digest = self
                .features
                .borrow()
                .is_enabled()
                .then(|| ImageDigest::of(img));
            let cached = match (reuse, &digest) {
                (FeatureReuse::Allow, Some(d)) => self.features.borrow_mut().get(d),
                _ => None,
            };
            let (grid_thw, input) = match cached {
                Some(c) => (c.grid_thw, ImageInput::Features(c.features)),
                None => {
                    let p = preprocess(img, &self.preprocess)?;
                    (p.grid_thw, ImageInput::Pixels(p))
                }
            };
            let [t, h, w] = grid_thw.map(|v| v as usize);
            counts.push(t * h * w / (merge as usize * merge as usize));
            prompt_images.push(PromptImage {
                digest,
                grid_thw,
                input,
            });
        }
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
            images: prompt_images,
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
        let logits = self.forward_last(&embeds, &positions, &mut cache)?;
        // Greedy decoding picks on the device and pipelines: step n+1 is queued before token
        // n is read, so host work (detokenizing, streaming) overlaps the next forward and only
        // one id crosses to the host. Sampling needs the logits on the host.
        let greedy = params.temperature == 0.0;
        let mut pending = if greedy {
            let pick = greedy_pick(&logits)?;
            self.eval_with_cache(&pick, &cache, false)?;
            Pending::Device(pick)
        } else {
            Pending::Host(self.logits_to_host(&logits, &cache)?)
        };
        timings.prefill = prefill_start.elapsed();

        let mut sampler = Sampler::new(params.seed);
        let mut decoder = IncrementalDecoder::default();
        let mut stops = StopMatcher::new(&params.stop);
        let mut text = String::new();
        let mut tokens = Vec::new();
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
            let last = step + 1 == budget;
            let position = next_position + step as i32;
            let token = match pending {
                Pending::Device(pick) => {
                    if !last {
                        let logits = self.forward_token(&pick, position, &mut cache)?;
                        let next = greedy_pick(&logits)?;
                        self.eval_with_cache(&next, &cache, true)?;
                        pending = Pending::Device(next);
                    } else {
                        pending = Pending::Done;
                    }
                    pick.try_item_exact::<u32>().map_err(|e| {
                        EngineError::Mlx(mlx_rs::error::Exception::custom(e.to_string()))
                    })?
                }
                Pending::Host(ref logits) => sampler.sample(logits, params),
                Pending::Done => break,
            };
            tokens.push(token);
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
            if last {
                break;
            }
            if !greedy {
                let id = Array::from_slice(&[token as i32], &[1, 1]);
                let logits = self.forward_token(&id, position, &mut cache)?;
                pending = Pending::Host(self.logits_to_host(&logits, &cache)?);
            }
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
            completion_tokens = tokens.len(),
            ?finish,
            prefill_ms = timings.prefill.as_millis() as u64,
            decode_ms = timings.decode.as_millis() as u64,
            "generation finished"
        );
        Ok(GenerationOutput {
            text,
            prompt_tokens: prompt_len,
            completion_tokens: tokens.len(),
            tokens,
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
        let grids: Vec<[u32; 3]> = prompt.images.iter().map(|i| i.grid_thw).collect();
        let merge = tower.config().spatial_merge_size;
        // The tower sees one image at a time (its attention never crosses images anyway),
        // so each image's features are their own buffer, cached on their own.
        let mut per_image = Vec::with_capacity(prompt.images.len());
        for image in &prompt.images {
            let features = match &image.input {
                ImageInput::Features(f) => f.clone(),
                ImageInput::Pixels(p) => {
                    let row_len = (p.data.len() / p.rows.max(1)) as i32;
                    let pixels = Array::from_slice(&p.data, &[p.rows as i32, row_len]);
                    let f = tower
                        .forward(&pixels, &[image.grid_thw])?
                        .as_dtype(embeds.dtype())?;
                    f.eval()?;
                    if let Some(digest) = image.digest {
                        self.features.borrow_mut().insert(
                            digest,
                            CachedFeatures {
                                grid_thw: image.grid_thw,
                                features: f.clone(),
                            },
                        );
                    }
                    f
                }
            };
            per_image.push(features);
        }
        let features = mlx_rs::ops::concatenate(&per_image, 0)?;
        timings.vision = vision_start.elapsed();

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

    /// The last position's logits `[1, vocab]` (lazy).
    fn forward_last(
        &self,
        embeds: &Array,
        positions: &Array,
        cache: &mut [LayerCache],
    ) -> Result<Array, EngineError> {
        let logits = self
            .model
            .forward(embeds, positions, cache, LogitsScope::Last)?;
        let vocab = logits.shape()[2];
        Ok(logits.reshape(&[1, vocab])?)
    }

    /// One decode step for the token `id` (any integer array of one element) at `position`.
    fn forward_token(
        &self,
        id: &Array,
        position: i32,
        cache: &mut [LayerCache],
    ) -> Result<Array, EngineError> {
        let embeds = self.model.embed(&id.reshape(&[1, 1])?)?;
        let positions = Array::from_slice(&[position; 3], &[3, 1]);
        self.forward_last(&embeds, &positions, cache)
    }

    /// Evaluates `out` with the cache, so the graph does not grow across steps; `queue` only
    /// schedules it.
    fn eval_with_cache(
        &self,
        out: &Array,
        cache: &[LayerCache],
        queue: bool,
    ) -> Result<(), EngineError> {
        let mut arrays: Vec<&Array> = cache.iter().flat_map(LayerCache::arrays).collect();
        arrays.push(out);
        if queue {
            mlx_rs::transforms::async_eval(arrays)?;
        } else {
            mlx_rs::transforms::eval(arrays)?;
        }
        Ok(())
    }

    /// Evaluates the logits with the cache and copies them to the host as f32.
    fn logits_to_host(
        &self,
        logits: &Array,
        cache: &[LayerCache],
    ) -> Result<Vec<f32>, EngineError> {
        let logits = logits.as_dtype(Dtype::Float32)?;
        self.eval_with_cache(&logits, cache, false)?;
        Ok(logits.as_slice::<f32>().to_vec())
    }

    /// Language model and vision tower, for parity tests and benchmarks.
    pub fn parts(&self) -> (&LanguageModel, Option<&VisionTower>) {
        (&self.model, self.vision_tower.as_ref())
    }
}

/// The next token's source during generation.
enum Pending {
    /// Greedy: the argmax, computed (or being computed) on the device.
    Device(Array),
    /// Sampling: the logits on the host.
    Host(Vec<f32>),
    Done,
}

/// The greedy token of `[1, vocab]` logits, as a one-element array (first index on ties, as
/// the host-side argmax).
fn greedy_pick(logits: &Array) -> Result<Array, EngineError> {
    Ok(mlx_rs::ops::indexing::argmax_axis(logits, -1, false)?)
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
