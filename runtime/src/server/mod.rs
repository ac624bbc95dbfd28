//! `cathedral serve`: mTLS listener (and an optional loopback plain one), the engine thread
//! behind a bounded queue, the vision gate, graceful shutdown and certificate reload.
//!
//! Start-up order: TLS files (fail fast on a bad path), kill switch, model load, then the
//! listeners, so anything that can connect finds the model loaded. Once listening, one line
//! goes to stdout: `cathedral listening mtls=https://ADDR [plain=http://ADDR]`.

pub mod config;
pub mod images;
pub mod listener;
pub mod tls;
pub mod worker;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{ServeArgs, ServeConfig};

use crate::api::state::{AppState, Limits};
use crate::killswitch::KillSwitch;
use crate::metrics::Metrics;
use images::RemoteImages;
use tls::{ReloadableTls, TlsFiles};
use worker::{EngineHandle, ShutdownFlags};

/// After the grace period, cancelled generations get this long to wind down.
const CANCEL_WIND_DOWN: Duration = Duration::from_secs(5);

/// The `cathedral serve` entry point: logging, settings, then [`run`].
pub fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let config = args.resolve()?;
    run(config)
}

/// Runs the server until SIGTERM/SIGINT; returns `Ok` after a graceful shutdown.
pub fn run(config: ServeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cathedral-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let tls = Arc::new(
        ReloadableTls::new(TlsFiles {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            client_ca: config.client_ca.clone(),
            allow_tls12: config.allow_tls12,
        })
        .context("loading TLS certificates")?,
    );
    let kill_switch = KillSwitch::new(&config.kill_switch);
    match kill_switch.read() {
        Ok(None) => tracing::info!(path = %config.kill_switch.display(), "kill switch released"),
        Ok(Some(st)) => tracing::warn!(
            path = %config.kill_switch.display(),
            by = %st.engaged_by, at = %st.engaged_at, reason = %st.reason,
            "kill switch ENGAGED: image input stays off until it is released"
        ),
        Err(e) => tracing::warn!(error = %e, "kill switch unreadable: image input stays off"),
    }
    let metrics = Arc::new(Metrics::new());
    let shutdown = Arc::new(ShutdownFlags::default());
    if config.max_concurrency > 1 {
        tracing::info!(
            max_concurrency = config.max_concurrency,
            "generations run one at a time on the engine thread; the extra slots queue"
        );
    }
    tracing::info!(model = %config.model.display(), vision_enabled = config.vision_enabled, "loading model");
    let model_dir = config.model.clone();
    let opts = crate::engine::EngineOptions {
        vision_enabled: config.vision_enabled,
        vision_cache_bytes: config.vision_cache_bytes,
    };
    let (max_c, max_q) = (config.max_concurrency, config.max_queue);
    let (m, s) = (metrics.clone(), shutdown.clone());
    let engine = tokio::task::spawn_blocking(move || {
        EngineHandle::start(&model_dir, opts, max_c, max_q, m, s)
    })
    .await
    .context("model loading task")?
    .with_context(|| format!("loading model from {}", config.model.display()))?;
    tracing::info!(
        model = %engine.info.id,
        context_length = engine.info.context_length,
        vision = ?engine.info.vision,
        load_seconds = format!("{:.2}", engine.info.load_time.as_secs_f64()),
        "model loaded"
    );
    let remote_images = if config.allow_remote_images {
        Some(
            RemoteImages::new(config.remote_image_max_bytes, config.remote_image_timeout)
                .context("building the remote image client")?,
        )
    } else {
        None
    };
    let state = Arc::new(AppState {
        engine,
        metrics,
        kill_switch,
        admins: config.admin_identities.clone(),
        limits: Limits {
            max_body_bytes: config.max_body_bytes,
            max_images: config.max_images,
            max_image_pixels: config.max_image_pixels,
            request_timeout: config.request_timeout,
        },
        remote_images,
        shutdown: shutdown.clone(),
        started,
    });
    let app = crate::api::routes::router(state.clone());

    let tls_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the mTLS listener on {}", config.listen))?;
    let tls_addr = tls_listener.local_addr()?;
    let plain_listener = match config.plain_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the plain listener on {addr}"))?,
        ),
        None => None,
    };
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    {
        let g = graceful.clone();
        loops.push(tokio::spawn(listener::accept_loop(
            tls_listener,
            Some(tls.clone()),
            app.clone(),
            move || g.watcher(),
            stop_rx.clone(),
        )));
    }
    let mut ready = format!("cathedral listening mtls=https://{tls_addr}");
    if let Some(l) = plain_listener {
        let addr = l.local_addr()?;
        ready.push_str(&format!(" plain=http://{addr}"));
        let g = graceful.clone();
        loops.push(tokio::spawn(listener::accept_loop(
            l,
            None,
            app.clone(),
            move || g.watcher(),
            stop_rx.clone(),
        )));
    }
    tracing::info!(
        mtls = %tls_addr,
        plain = ?config.plain_listen,
        startup_seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "listening"
    );
    spawn_reload_on_sighup(tls);
    let termination = Termination::install()?;
    println!("{ready}");
    termination.wait().await;

    tracing::info!(
        grace_seconds = config.shutdown_grace.as_secs(),
        "shutting down: no new connections; finishing in-flight requests"
    );
    shutdown.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    drop(app);
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| GracefulShutdown::new());
    let mut drain = Box::pin(graceful.shutdown());
    if tokio::time::timeout(config.shutdown_grace, &mut drain)
        .await
        .is_err()
    {
        tracing::warn!("grace period over: cancelling in-flight generations");
        shutdown.cancel_all.store(true, Ordering::Relaxed);
        if tokio::time::timeout(CANCEL_WIND_DOWN, &mut drain)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after cancelling; closing them");
        }
    }
    // The last handle on the engine's queue goes with the state: the engine thread then
    // finishes, and is waited for, before the process exits (MLX tears down its globals at
    // exit; a thread still freeing MLX objects then corrupts the heap).
    drop(state);
    if !shutdown.engine_stopped(CANCEL_WIND_DOWN).await {
        tracing::warn!("the engine thread has not ended after cancelling; exiting anyway");
    }
    tracing::info!("shutdown complete");
    Ok(())
}

#[cfg(unix)]
fn spawn_reload_on_sighup(tls: Arc<ReloadableTls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: certificate reload disabled");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => {
                    tracing::info!("SIGHUP: TLS certificates reloaded (open connections kept)")
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: reload failed; keeping the previous certificates")
                }
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_reload_on_sighup(_tls: Arc<ReloadableTls>) {}

/// SIGTERM (what launchd's bootout sends) or SIGINT; installed before the ready line so that
/// an early signal is never fatal.
struct Termination {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Termination {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
