//! The HTTP face: the same [`MockProvider`] served over HTTP/1.1 and h2c on loopback.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::provider::MockProvider;

/// A running loopback HTTP server in front of a [`MockProvider`].
///
/// Speaks HTTP/1.1 and HTTP/2 without TLS (h2c, prior knowledge), chosen per
/// connection. Records are shared with the provider it was started with, so
/// `server.provider().attempts()` lists what arrived over the wire.
///
/// Transport faults really happen on the connection:
/// [`ResetBeforeHead`](crate::Fault::ResetBeforeHead) and
/// [`ConnectRefused`](crate::Fault::ConnectRefused) close it without any response
/// (a TCP server cannot refuse a connection it has already accepted and read a
/// model from, so over HTTP a refusal looks like a reset);
/// [`ResetAfterHead`](crate::Fault::ResetAfterHead) and
/// [`ResetAfterChunks`](crate::Fault::ResetAfterChunks) abort it after the head
/// (HTTP/2: the stream is reset); [`Hang`](crate::Fault::Hang) never answers.
///
/// Dropping the server or calling [`shutdown`](Self::shutdown) stops accepting and
/// closes every open connection.
pub struct MockServer {
    local_addr: SocketAddr,
    provider: MockProvider,
    accept_loop: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `addr` (use port 0 for any free port, e.g. `127.0.0.1:0`) and serves
    /// `provider` (a [`MockProvider`] or a [`Scenario`](crate::Scenario)).
    pub async fn start(provider: impl Into<MockProvider>, addr: SocketAddr) -> io::Result<Self> {
        let provider = provider.into();
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let accept_loop = tokio::spawn(accept(listener, provider.clone()));
        Ok(MockServer {
            local_addr,
            provider,
            accept_loop: Some(accept_loop),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>/v1`, the base URL an OpenAI client is configured with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.local_addr)
    }

    /// The provider behind the server (shares its records).
    pub fn provider(&self) -> &MockProvider {
        &self.provider
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(mut self) {
        if let Some(accept_loop) = self.accept_loop.take() {
            accept_loop.abort();
            // Waiting for the abort guarantees the connections are closed on
            // return; the task's only possible outcome now is "cancelled".
            let _cancelled = accept_loop.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(accept_loop) = &self.accept_loop {
            accept_loop.abort();
        }
    }
}

impl fmt::Debug for MockServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockServer")
            .field("local_addr", &self.local_addr)
            .field("provider", &self.provider)
            .finish()
    }
}

/// Accepts connections until cancelled; cancelling drops the `JoinSet`, which
/// aborts every connection task with it.
async fn accept(listener: TcpListener, provider: MockProvider) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _peer)) = listener.accept().await else {
            // Accept errors (such as too many open files) are transient; keep serving.
            tokio::task::yield_now().await;
            continue;
        };
        let service = TowerToHyperService::new(provider.clone());
        connections.spawn(async move {
            // A connection ending in error is the point of several faults
            // (resets); there is nobody to report it to.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
