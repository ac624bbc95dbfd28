//! The engine thread: the one place the model lives (MLX state is not shared across threads).
//! Requests reach it through a bounded queue; admission beyond `max_concurrency + max_queue`
//! is refused up front (429) so nobody waits without bound. Each job streams its text deltas
//! back; the sink stops the generation when the client has gone, the deadline has passed or the
//! server is shutting down.
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::engine::{
    Engine, EngineError, EngineOptions, FeatureReuse, FinishReason, GenerationOutput,
    SamplingParams, VisionAvailability,
};
use crate::metrics::Metrics;
use crate::prompt::ChatMessage;

/// What the HTTP side knows about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub context_length: usize,
    pub vision: VisionAvailability,
    pub load_time: Duration,
}

/// Why a generation ended early (or `Natural` when the engine decided: stop or length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Natural,
    ClientGone,
    Timeout,
    Shutdown,
}

#[derive(Debug)]
pub enum JobError {
    Engine(EngineError),
    /// The prompt plus the requested completion does not fit the context.
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        limit: usize,
    },
    /// The deadline passed before the engine got to the job.
    TimedOutInQueue,
    /// The server began shutting down before the engine got to the job.
    ShuttingDown,
}

#[derive(Debug)]
pub enum JobEvent {
    Started {
        prompt_tokens: usize,
    },
    Delta(String),
    Finished {
        output: GenerationOutput,
        end: JobEnd,
    },
    Failed(JobError),
}

pub struct Job {
    pub messages: Vec<ChatMessage>,
    /// `None`: as many as the context leaves.
    pub max_tokens: Option<usize>,
    pub params: SamplingParams,
    pub events: mpsc::UnboundedSender<JobEvent>,
    pub cancel: Arc<AtomicBool>,
    pub deadline: Instant,
    /// `Recompute` when the client sent `Cache-Control: no-cache`.
    pub image_features: FeatureReuse,
}

/// Flags the shutdown sequence raises; the engine thread reads them between tokens.
#[derive(Debug, Default)]
pub struct ShutdownFlags {
    /// No new work is accepted.
    pub draining: AtomicBool,
    /// In-flight work is cut short now.
    pub cancel_all: AtomicBool,
    /// The engine thread: shutdown waits for it to end (its MLX work settled, its
    /// thread-local MLX state freed) before the process exits.
    pub engine_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ShutdownFlags {
    /// Waits, at most `limit`, for the engine thread to end; it does once the last handle on
    /// its queue is gone and its current job has wound down. Whether it ended in time.
    pub async fn engine_stopped(&self, limit: Duration) -> bool {
        let thread = self
            .engine_thread
            .lock()
            .map(|mut t| t.take())
            .ok()
            .flatten();
        let Some(thread) = thread else { return true };
        let deadline = Instant::now() + limit;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                // Still parked or busy: exit cuts it, which is the best left to do.
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = thread.join();
        true
    }
}

/// Blocks until MLX has run everything queued on the default stream. A generation that
/// ends early (cancelled, cut by shutdown) can leave a pipelined decode step in flight.
fn settle_mlx() {
    // SAFETY: no arguments; MLX waits on its own default stream.
    let rc = unsafe { mlx_sys::mlx_synchronize_default() };
    if rc != 0 {
        tracing::warn!(rc, "MLX could not synchronize its default stream");
    }
}

/// The HTTP side's handle on the engine thread.
pub struct EngineHandle {
    tx: SyncSender<Job>,
    admission: Arc<Semaphore>,
    capacity: usize,
    max_concurrency: usize,
    /// Mean job duration (exponentially weighted), microseconds: for Retry-After.
    mean_job_us: Arc<AtomicU64>,
    pub info: ModelInfo,
}

/// An admitted request: holds its place until dropped.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the model failed: {0}")]
    Load(#[source] EngineError),
    #[error("the engine thread could not start: {0}")]
    Thread(std::io::Error),
    #[error("the engine thread ended while loading the model")]
    Died,
}

impl EngineHandle {
    /// Starts the engine thread and loads the model on it; returns once it is loaded.
    pub fn start(
        model_dir: &Path,
        opts: EngineOptions,
        max_concurrency: usize,
        max_queue: usize,
        metrics: Arc<Metrics>,
        shutdown: Arc<ShutdownFlags>,
    ) -> Result<Self, StartError> {
        let capacity = max_concurrency + max_queue;
        let (tx, rx) = sync_channel::<Job>(capacity);
        let (ready_tx, ready_rx) = sync_channel::<Result<ModelInfo, EngineError>>(1);
        let dir = model_dir.to_path_buf();
        let mean_job_us = Arc::new(AtomicU64::new(0));
        let mean = mean_job_us.clone();
        let flags = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let started = Instant::now();
                let engine = match Engine::load(&dir, &opts) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let info = ModelInfo {
                    id: engine.model_id().to_string(),
                    context_length: engine.context_length(),
                    vision: engine.vision(),
                    load_time: started.elapsed(),
                };
                if ready_tx.send(Ok(info)).is_err() {
                    return;
                }
                let _crash = ExitOnPanic;
                run_engine(engine, rx, &metrics, &shutdown, &mean);
            })
            .map_err(StartError::Thread)?;
        if let Ok(mut slot) = flags.engine_thread.lock() {
            *slot = Some(thread);
        }
        let info = match ready_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return Err(StartError::Load(e)),
            Err(_) => return Err(StartError::Died),
        };
        Ok(Self {
            tx,
            admission: Arc::new(Semaphore::new(capacity)),
            capacity,
            max_concurrency,
            mean_job_us,
            info,
        })
    }

    /// A place in the queue, or `None` when it is full.
    pub fn admit(&self) -> Option<Admission> {
        self.admission
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Admission { _permit: p })
    }

    /// Requests admitted now (waiting or running).
    pub fn admitted(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Seconds a refused client should wait: the queue's expected drain time, 1 s to 2 min.
    pub fn retry_after_secs(&self) -> u64 {
        let mean = Duration::from_micros(self.mean_job_us.load(Ordering::Relaxed));
        let waiting = self.admitted().saturating_sub(self.max_concurrency) + 1;
        let secs = (mean.as_secs_f64() * waiting as f64).ceil() as u64;
        secs.clamp(1, 120)
    }

    /// Hands a job to the engine thread. The caller holds an [`Admission`], so the queue has
    /// room; `false` only if the engine thread is gone.
    pub fn submit(&self, job: Job) -> bool {
        self.tx.try_send(job).is_ok()
    }
}

/// A panic on the engine thread leaves no model to serve: exit non-zero so that the supervisor
/// (launchd `KeepAlive`) restarts the process, instead of answering 500 forever.
struct ExitOnPanic;

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "the engine thread panicked; exiting so the supervisor restarts the server"
            );
            std::process::exit(70);
        }
    }
}

fn run_engine(
    mut engine: Engine,
    rx: Receiver<Job>,
    metrics: &Metrics,
    shutdown: &ShutdownFlags,
    mean_job_us: &AtomicU64,
) {
    metrics.queue_depth().set(0);
    while let Ok(job) = rx.recv() {
        metrics.queue_depth().dec();
        let began = Instant::now();
        run_job(&mut engine, job, shutdown, metrics);
        settle_mlx();
        // EWMA with weight 1/4 on the newest job.
        let took = began.elapsed().as_micros() as u64;
        let old = mean_job_us.load(Ordering::Relaxed);
        let new = if old == 0 { took } else { (old * 3 + took) / 4 };
        mean_job_us.store(new, Ordering::Relaxed);
    }
    tracing::info!("engine thread stopped");
}

fn run_job(engine: &mut Engine, job: Job, shutdown: &ShutdownFlags, metrics: &Metrics) {
    let Job {
        messages,
        max_tokens,
        mut params,
        events,
        cancel,
        deadline,
        image_features,
    } = job;
    if cancel.load(Ordering::Relaxed) || events.is_closed() {
        return; // the client left while waiting
    }
    if shutdown.cancel_all.load(Ordering::Relaxed) {
        let _ = events.send(JobEvent::Failed(JobError::ShuttingDown));
        return;
    }
    if Instant::now() >= deadline {
        let _ = events.send(JobEvent::Failed(JobError::TimedOutInQueue));
        return;
    }
    let prepared = match engine.prepare_with(&messages, image_features) {
        Ok(p) => p,
        Err(e) => {
            let _ = events.send(JobEvent::Failed(JobError::Engine(e)));
            return;
        }
    };
    drop(messages);
    let prompt_tokens = prepared.prompt_tokens();
    let limit = engine.context_length();
    let room = limit.saturating_sub(prompt_tokens);
    match max_tokens {
        Some(m) if m > room => {
            let _ = events.send(JobEvent::Failed(JobError::ContextOverflow {
                prompt_tokens,
                max_tokens: m,
                limit,
            }));
            return;
        }
        Some(m) => params.max_tokens = m,
        None if room == 0 => {
            let _ = events.send(JobEvent::Failed(JobError::ContextOverflow {
                prompt_tokens,
                max_tokens: 1,
                limit,
            }));
            return;
        }
        None => params.max_tokens = room,
    }
    if events.send(JobEvent::Started { prompt_tokens }).is_err() {
        return;
    }
    let mut end = JobEnd::Natural;
    let mut sink = |delta: &str| -> ControlFlow<()> {
        if shutdown.cancel_all.load(Ordering::Relaxed) {
            end = JobEnd::Shutdown;
        } else if cancel.load(Ordering::Relaxed) {
            end = JobEnd::ClientGone;
        } else if Instant::now() >= deadline {
            end = JobEnd::Timeout;
        } else if events.send(JobEvent::Delta(delta.to_string())).is_err() {
            end = JobEnd::ClientGone;
        }
        if end == JobEnd::Natural {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    };
    let result = engine.generate(&prepared, &params, &mut sink);
    match result {
        Ok(output) => {
            let end = if output.finish_reason == FinishReason::Cancelled && end == JobEnd::Natural {
                JobEnd::ClientGone
            } else {
                end
            };
            // Recorded here, not by the HTTP side: a client that left still cost engine time.
            metrics.finished(finish_label(output.finish_reason, end));
            metrics.tokens(
                prompt_tokens,
                output.completion_tokens,
                output.timings.decode,
            );
            if prepared.image_count() > 0 {
                let cached = prepared.cached_images();
                metrics.images(prepared.image_count() - cached, cached);
                if cached < prepared.image_count() {
                    metrics.vision_tower(output.timings.vision);
                }
            }
            let _ = events.send(JobEvent::Finished { output, end });
        }
        Err(e) => {
            tracing::warn!(error = %e, "generation failed");
            let _ = events.send(JobEvent::Failed(JobError::Engine(e)));
        }
    }
}

fn finish_label(reason: FinishReason, end: JobEnd) -> &'static str {
    match end {
        JobEnd::Natural => match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        },
        JobEnd::ClientGone => "cancelled",
        JobEnd::Timeout => "timeout",
        JobEnd::Shutdown => "shutdown",
    }
}
