//! The listening side: accepting connections (HTTP/1.1 and h2c, chosen per
//! connection), and a graceful shutdown that stops accepting, lets in-flight
//! requests finish within a bound, then closes what is left.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backstop::mock::MockServer;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::service::{Shared, handle};

/// A running proxy. [`shutdown`](Self::shutdown) stops it and waits; dropping the
/// handle starts the same graceful shutdown without waiting for it.
pub struct ProxyHandle {
    pub(crate) local_addr: SocketAddr,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) task: JoinHandle<()>,
    pub(crate) mock: Option<MockServer>,
}

impl fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("local_addr", &self.local_addr)
            .field("mock", &self.mock)
            .finish_non_exhaustive()
    }
}

impl ProxyHandle {
    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>/v1`: what to give an OpenAI client as its base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.local_addr)
    }

    /// The built-in mock provider the proxy fronts, when it was started without a
    /// configuration.
    pub fn mock(&self) -> Option<&MockServer> {
        self.mock.as_ref()
    }

    /// Stops accepting, waits for in-flight requests (streams included) up to the
    /// drain timeout, then closes the connections still open.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            // The accept loop may already have ended; nothing to stop then.
            let _already_stopped = stop.send(());
        }
        if let Err(error) = (&mut self.task).await {
            tracing::warn!(target: "backstop::proxy", %error, "the accept loop ended abnormally");
        }
        if let Some(mock) = self.mock.take() {
            mock.shutdown().await;
        }
    }
}

/// Accepts connections until `stop` fires, then drains.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // With a timer, hyper enforces its 30 s limit on reading a request head, so a
    // client that opens connections and never finishes its headers cannot pin them.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of file descriptors and the like: pause instead of
                        // spinning, then keep serving the connections already open.
                        tracing::warn!(target: "backstop::proxy", %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let service = hyper::service::service_fn(move |request| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(shared, request).await) }
                });
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                // Reap finished connections so a long-running proxy does not keep them.
                while connections.try_join_next().is_some() {}
                connections.spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(target: "backstop::proxy", %peer, %error, "connection ended with an error");
                    }
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    tracing::info!(target: "backstop::proxy", in_flight = graceful.count(), "shutting down: no new connections; draining");
    tokio::select! {
        () = graceful.shutdown() => {
            tracing::info!(target: "backstop::proxy", "drained");
        }
        () = tokio::time::sleep(drain) => {
            tracing::warn!(target: "backstop::proxy", open = connections.len(), "drain timeout reached; closing the connections still open");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}
