//! Accept loops: mTLS (peer identity from the client certificate) and the loopback plain
//! listener. Every connection is watched for graceful shutdown: on SIGTERM the loops stop
//! accepting and open connections finish the response they are sending, then close.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use super::tls::{Peer, ReloadableTls};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections per listener; beyond it new ones wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;

/// Accepts until `stop` turns true. `watcher` makes a watcher per connection.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    app: Router,
    watcher: impl Fn() -> Watcher,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("semaphore never closed"),
            _ = stop.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let w = watcher();
        match &tls {
            Some(tls) => {
                let acceptor = tls.acceptor();
                tokio::spawn(async move {
                    let _slot = slot;
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(peer = %addr, "TLS handshake timed out");
                                return;
                            }
                        };
                    let peer = Peer::from_tls(stream.get_ref().1);
                    tracing::debug!(peer = %addr, identity = ?peer.identity(), "TLS connection");
                    serve_connection(stream, app, peer, w).await;
                });
            }
            None => {
                tokio::spawn(async move {
                    let _slot = slot;
                    serve_connection(tcp, app, Peer::Plain, w).await;
                });
            }
        }
    }
}

async fn serve_connection<S>(io: S, app: Router, peer: Peer, watcher: Watcher)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        app.clone().oneshot(req)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
