//! The HTTP face: the same [`MockProvider`] served over HTTP/1.1 and h2c on loopback.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioIo;
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
    tasks: Tasks,
}

impl MockServer {
    /// Binds `addr` (use port 0 for any free port, e.g. `127.0.0.1:0`) and serves
    /// `provider` (a [`MockProvider`] or a [`Scenario`](crate::Scenario)).
    pub async fn start(provider: impl Into<MockProvider>, addr: SocketAddr) -> io::Result<Self> {
        let provider = provider.into();
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let tasks = Tasks::default();
        let accept_loop = tokio::spawn(accept(listener, provider.clone(), tasks.clone()));
        Ok(MockServer {
            local_addr,
            provider,
            accept_loop: Some(accept_loop),
            tasks,
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
            // The task's only possible outcome now is "cancelled".
            let _cancelled = accept_loop.await;
        }
        self.tasks.abort_all();
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(accept_loop) = &self.accept_loop {
            accept_loop.abort();
        }
        self.tasks.abort_all();
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

/// Every task the server runs: connections, and the HTTP/2 streams hyper spawns
/// for them. Keeping them in one set lets shutdown end them all, including
/// streams that hang (which hyper would otherwise leave running detached).
#[derive(Clone, Default)]
struct Tasks(Arc<Mutex<JoinSet<()>>>);

impl Tasks {
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Reap finished tasks so a long-running server does not accumulate them.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    fn abort_all(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .abort_all();
    }
}

impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawn(async move {
            future.await;
        });
    }
}

/// Accepts connections until cancelled.
async fn accept(listener: TcpListener, provider: MockProvider, tasks: Tasks) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            // Accept errors (such as too many open files) are usually transient:
            // back off briefly and keep serving.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let service = TowerToHyperService::new(provider.clone());
        let executor = tasks.clone();
        tasks.spawn(async move {
            // A connection ending in error is the point of several faults
            // (resets); there is nobody to report it to.
            let _ = auto::Builder::new(executor)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
