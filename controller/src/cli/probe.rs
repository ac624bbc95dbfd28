//! `cathedralctl probe`: one request to a runtime over mTLS, the same probe the canary and the
//! deploy health gate send.
use anyhow::Context;
use cathedral_canary::probe::{ImageBytes, ProbeKind, ProbeOutcome, ProbeSpec, Prober};
use cathedral_canary::window::fmt_ms;
use cathedral_runtime::client::ClientTls;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// Where a probe goes and with which certificate (shared by `probe` and `canary watch`).
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Base URL of the runtime, e.g. https://mini.local:1337
    #[arg(long)]
    pub target: String,
    /// Client certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// CA that signed the runtime's certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// Per-probe timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// `model` field of the request (default: left out; the runtime serves one model).
    #[arg(long)]
    pub model: Option<String>,
    /// Tokens to generate per probe.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: u32,
    /// Fail a probe whose answer does not contain this text (case-insensitive).
    #[arg(long)]
    pub expect: Option<String>,
}

impl TargetArgs {
    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    pub fn prober(&self, image: Option<&PathBuf>) -> anyhow::Result<Prober> {
        let image = image.map(|p| ImageBytes::from_file(p)).transpose()?;
        let spec = ProbeSpec {
            model: self.model.clone(),
            max_tokens: self.max_tokens,
            timeout: self.timeout,
            image,
            expect: self.expect.clone(),
        };
        Ok(Prober::mtls(&self.target, &self.tls(), spec)?)
    }
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Send a multimodal probe with this image (PNG, JPEG, WebP, GIF).
    #[arg(long, conflicts_with = "builtin_image")]
    pub image: Option<PathBuf>,
    /// Send a multimodal probe with the built-in image (four coloured quadrants).
    #[arg(long)]
    pub builtin_image: bool,
    /// Send a text probe. With neither this nor an image flag, both probes are sent.
    #[arg(long)]
    pub text: bool,
    /// Print each outcome as a JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let vision = args.image.is_some() || args.builtin_image;
    let kinds: Vec<ProbeKind> = match (vision, args.text) {
        (true, true) | (false, false) => vec![ProbeKind::Vision, ProbeKind::Text],
        (true, false) => vec![ProbeKind::Vision],
        (false, true) => vec![ProbeKind::Text],
    };
    let prober = args.target.prober(args.image.as_ref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut failed = 0;
    for kind in kinds {
        let outcome = runtime.block_on(prober.probe(kind));
        if args.json {
            println!("{}", serde_json::to_string(&outcome)?);
        } else {
            print!("{}", describe(&outcome));
        }
        if !outcome.is_success() {
            failed += 1;
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} probe(s) failed against {}", args.target.target);
    }
    Ok(())
}

/// Human-readable lines for one outcome.
pub fn describe(o: &ProbeOutcome) -> String {
    let status = o.status.map_or("---".to_owned(), |s| s.to_string());
    let latency = fmt_ms(o.latency.as_secs_f64() * 1000.0);
    let mut out = match &o.error_class {
        None => format!("{:<6} ok     {status}  {latency}", o.kind),
        Some(class) => format!("{:<6} FAILED {status}  {latency}  {class}", o.kind),
    };
    if let Some(u) = o.usage {
        out.push_str(&format!(
            "  tokens {} prompt / {} completion",
            u.prompt_tokens, u.completion_tokens
        ));
    }
    out.push('\n');
    if let Some(answer) = &o.answer {
        out.push_str(&format!("       answer: {answer:?}\n"));
    }
    if let Some(error) = &o.error {
        out.push_str(&format!("       error: {error}\n"));
    }
    out
}
