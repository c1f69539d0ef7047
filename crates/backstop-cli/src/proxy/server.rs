//! The listening side: accepting connections (HTTP/1.1 and h2c, chosen per
//! connection) up to a bound, the per-connection limits (head size and read time,
//! HTTP/2 streams, idle time, write time), and a graceful shutdown that stops accepting, lets
//! in-flight requests finish within a bound, then closes what is left.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use backstop::mock::MockServer;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::admission::connection_limit_answer;
use super::config::Limits;
use super::h2_streams::{OpenStreams, StreamBody};
use super::handshake::{Prefixed, Protocol, read_preface};
use super::service::{Shared, handle};
use super::write_timeout::{WriteStalled, WriteTimeout};

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
    limits: Limits,
) {
    let protocols = Protocols::new(&limits);
    let connection_slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusal_slots = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let graceful = GracefulShutdown::new();
    // Connections still choosing their protocol have no request in flight: at
    // shutdown they close at once instead of waiting out the preface timeout.
    let (stopping, stopping_seen) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of
                    // spinning, then keep serving the connections already open.
                    tracing::warn!(target: "backstop::proxy", %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        // Reap finished connections so a long-running proxy does not keep them.
        while connections.try_join_next().is_some() {}
        match connection_slots.clone().try_acquire_owned() {
            Ok(slot) => {
                connections.spawn(serve_connection(
                    stream,
                    peer,
                    shared.clone(),
                    protocols.clone(),
                    graceful.watcher(),
                    stopping_seen.clone(),
                    slot,
                ));
            }
            // At the connection limit: a clear, immediate 503 rather than leaving
            // the client in the listen backlog (where it may wait out SYN retries,
            // a minute or more). At most `REFUSALS_AT_ONCE` are written at a time;
            // beyond that a connection is closed at once.
            Err(_no_slot) => {
                shared.counters.connection_refused();
                match refusal_slots.clone().try_acquire_owned() {
                    Ok(refusal) => {
                        connections.spawn(refuse(stream, limits.max_connections, refusal));
                    }
                    Err(_) => drop(stream),
                }
            }
        }
    }
    drop(listener);
    stopping.send_replace(true);
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

/// The two protocol builders, configured once with the proxy's limits.
#[derive(Clone)]
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    preface_timeout: Duration,
    /// How long an HTTP/2 connection may stay open with no stream open.
    idle_timeout: Duration,
    /// How long one write to the client may wait.
    write_timeout: Duration,
}

impl Protocols {
    fn new(limits: &Limits) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            // With a timer, hyper bounds the time to read each request head (and an
            // idle keep-alive connection, which waits for the next head).
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // A head over the cap is answered 431 and the connection closed.
            .max_header_size(limits.max_header_bytes)
            // The read buffer may not grow past the head cap either (hyper's floor
            // is 8 KiB): body bytes are read in pieces of at most this size.
            .max_buf_size(limits.max_header_bytes.max(16 * 1024));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            // A peer that vanished without a FIN is found and its streams dropped.
            .keep_alive_interval(Some(HTTP2_KEEP_ALIVE_INTERVAL))
            .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT);
        Protocols {
            http1,
            http2,
            preface_timeout: limits.header_read_timeout,
            // The bound HTTP/1.1's header read timeout puts on an idle keep-alive
            // connection.
            idle_timeout: limits.header_read_timeout,
            write_timeout: limits.write_timeout,
        }
    }
}

/// Counts a connection as open while it lives, however its task ends (aborted at
/// the drain bound included).
struct OpenConnection(Arc<Shared>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.counters.connection_closed();
    }
}

/// Connections over the limit being answered at once (each for at most
/// `REFUSAL_LINGER`).
const REFUSALS_AT_ONCE: usize = 64;

/// How long a refused connection is kept to deliver its 503: the client's request
/// bytes are read and discarded meanwhile, since closing with them unread would
/// make the kernel reset the connection and could destroy the answer in flight. A
/// client that sends nothing in that time is closed without an answer.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Answers a connection over the limit with [`connection_limit_answer`] and closes it.
async fn refuse(mut stream: TcpStream, max_connections: usize, _refusal: OwnedSemaphorePermit) {
    let answer = connection_limit_answer(max_connections);
    let deliver = async {
        let mut discard = [0u8; 4096];
        // Answer once the request has started: an HTTP client treats bytes that
        // arrive before it sent anything as a broken connection, not an answer.
        if stream.read(&mut discard).await? == 0 {
            return Ok(());
        }
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        while stream.read(&mut discard).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    // A timeout or an error both end in closing: nothing more is owed.
    let _ = tokio::time::timeout(REFUSAL_LINGER, deliver).await;
}

/// How often an HTTP/2 connection is pinged, and how long the answer may take.
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves one connection: the protocol, chosen within the header read timeout, then
/// requests until either side closes. `_slot` is the connection's place under
/// `max_connections`, freed when this returns.
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    protocols: Protocols,
    watcher: Watcher,
    mut stopping: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    shared.counters.connection_opened();
    let _open = OpenConnection(shared.clone());
    // Streams are written event by event: no Nagle delay on small SSE frames.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(target: "backstop::proxy", %peer, %error, "cannot disable Nagle's algorithm");
    }
    let preface = tokio::select! {
        preface = tokio::time::timeout(protocols.preface_timeout, read_preface(&mut stream)) => preface,
        // A pooled spare connection a client opened but never used: nothing to drain.
        _ = stopping.wait_for(|stopping| *stopping) => return,
    };
    let (protocol, first) = match preface {
        Ok(Ok(decided)) => decided,
        Ok(Err(error)) => {
            tracing::debug!(target: "backstop::proxy", %peer, %error, "connection closed before its first request");
            return;
        }
        Err(_elapsed) => {
            tracing::debug!(target: "backstop::proxy", %peer, "no request within the header read timeout; closing");
            return;
        }
    };
    let counters = shared.clone();
    // The client stopped taking its response: the connection ends, which drops its
    // streams and, with them, the upstream requests.
    let on_stall = move |stalled: WriteStalled| {
        counters.counters.write_timed_out();
        tracing::info!(target: "backstop::proxy", %peer, %stalled, "the client stopped reading; closing its connection");
    };
    let io = TokioIo::new(WriteTimeout::new(
        Prefixed::new(first, stream),
        protocols.write_timeout,
        on_stall.clone(),
    ));
    let served = match protocol {
        Protocol::Http1 => {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, request).await) }
            });
            watcher
                .watch(protocols.http1.serve_connection(io, service))
                .await
        }
        Protocol::Http2 => {
            let streams = OpenStreams::default();
            let idle = streams.idle_for(protocols.idle_timeout);
            // The client stopped taking data on every open stream: the connection
            // is closed. One stream the client left unread for the write timeout,
            // beside others it reads: its upstream request is dropped, and hyper
            // resets the stream if the client ever asks for more of it.
            let cut_counters = shared.clone();
            let after = protocols.write_timeout;
            let stalled = streams.watch_client(protocols.write_timeout, move || {
                cut_counters.counters.unread_stream_cut();
                let after = humantime::format_duration(after);
                tracing::info!(target: "backstop::proxy", %peer, %after, "the client left an HTTP/2 stream unread; dropping its upstream request");
            });
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                let open = streams.open();
                async move {
                    let response = handle(shared, request).await;
                    Ok::<_, Infallible>(response.map(|body| StreamBody::new(body, open)))
                }
            });
            // Asked to close (GOAWAY: the open streams finish, no new one starts)
            // once idle or when the proxy stops; `watcher`, kept until it ends,
            // makes the proxy's drain wait for it.
            let _watcher = watcher;
            let mut connection = pin!(protocols.http2.serve_connection(io, service));
            let mut idle = pin!(idle);
            let mut stalled = pin!(stalled);
            let mut closing = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => break served,
                    // The client's HTTP/2 stack reads the socket but has taken no
                    // data for the write timeout: closed at once, since its streams
                    // would never finish a graceful close.
                    () = &mut stalled => {
                        on_stall(WriteStalled { after: protocols.write_timeout });
                        break Ok(());
                    }
                    () = &mut idle, if !closing => {
                        tracing::debug!(target: "backstop::proxy", %peer, "HTTP/2 connection idle; closing it");
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    // An error means the accept loop is gone: stopping too.
                    _ = stopping.wait_for(|stopping| *stopping), if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    };
    if let Err(error) = served {
        // Malformed requests, oversized heads, timeouts and clients leaving all end
        // here; hyper has already answered 400/431 where HTTP/1.1 allows it.
        tracing::debug!(target: "backstop::proxy", %peer, %error, "connection ended with an error");
    }
}
