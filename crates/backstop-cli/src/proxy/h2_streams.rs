//! The streams of one HTTP/2 connection: how many are open (for the connection's
//! idle timeout) and which are waiting for the client to take their data (for the
//! write timeout).
//!
//! hyper has no idle timeout for HTTP/2, and a client answers keep-alive pings
//! however long it stays idle: [`OpenStreams::idle_for`] resolves once no stream has
//! been open for a while, and the connection is then sent GOAWAY.
//!
//! A client whose HTTP/2 stack keeps reading its socket but stops releasing
//! flow-control window (its application stopped reading the response) never makes
//! the socket's writes wait, so the connection's [`WriteTimeout`] does not see it:
//! hyper just stops asking the stream's body for data. A stream is *waiting for the
//! client* from the moment its body hands hyper a frame until hyper asks for the
//! next one; while the client takes data that moment is immediately followed by the
//! next request (hyper asks once the frame fits the window, so a client that takes
//! a frame slowly counts as waiting until it has all of it; providers' frames are
//! a few KiB). [`OpenStreams::stalled_for`] resolves once every open stream has
//! waited for the client for the whole timeout: the client has taken nothing on
//! this connection for that long, and the connection is closed, which drops its
//! streams and the upstream requests behind them. A stream waiting for its provider
//! (a reasoning model silent for minutes) is not waiting for the client, and keeps
//! its connection open. One stream left unread beside streams that are read cannot
//! be cut alone: hyper gives no way to reset a stream whose body it is not polling.
//!
//! [`WriteTimeout`]: super::write_timeout::WriteTimeout

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::instant_after;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::watch;
use tokio::time::Instant;

/// The streams open on one HTTP/2 connection (a stream is open from its request
/// head to its response's last byte).
#[derive(Clone)]
pub(crate) struct OpenStreams(Arc<Streams>);

struct Streams {
    open: watch::Sender<Count>,
    /// Each open stream's [`Waiting`] mark.
    waiting: Mutex<Vec<Arc<Waiting>>>,
    /// The instant `Waiting` marks count from.
    origin: Instant,
}

/// The streams open now, and how many were ever opened: a stream that opens and
/// closes before the idle timer's task looks still shows in the second.
#[derive(Clone, Copy, Default)]
struct Count {
    open: usize,
    opened: u64,
}

/// Since when a stream has waited for the client: nanoseconds after the
/// connection's origin, plus one; zero while it is not waiting.
#[derive(Default)]
struct Waiting(AtomicU64);

/// One open stream; closed when dropped.
pub(crate) struct OpenStream {
    streams: OpenStreams,
    waiting: Arc<Waiting>,
}

impl Default for OpenStreams {
    fn default() -> Self {
        OpenStreams(Arc::new(Streams {
            open: watch::Sender::new(Count::default()),
            waiting: Mutex::new(Vec::new()),
            origin: Instant::now(),
        }))
    }
}

impl OpenStreams {
    pub(crate) fn open(&self) -> OpenStream {
        let waiting = Arc::new(Waiting::default());
        self.0
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(waiting.clone());
        self.0.open.send_modify(|count| {
            count.open += 1;
            count.opened += 1;
        });
        OpenStream {
            streams: self.clone(),
            waiting,
        }
    }

    /// Resolves once no stream has been open for `timeout` (at once counting from
    /// now, if none is).
    pub(crate) fn idle_for(&self, timeout: Duration) -> impl Future<Output = ()> + use<> {
        let mut open = self.0.open.subscribe();
        async move {
            loop {
                // Errors mean the connection's service is gone: nothing is open.
                let Ok(idle) = open.wait_for(|count| count.open == 0).await.map(|c| *c) else {
                    return;
                };
                let busy_again = tokio::time::timeout(
                    timeout,
                    open.wait_for(|count| count.open > 0 || count.opened != idle.opened),
                );
                match busy_again.await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(_)) | Err(_) => return,
                }
            }
        }
    }

    /// Resolves once at least one stream is open and every open stream has waited
    /// for the client for `timeout`.
    pub(crate) fn stalled_for(&self, timeout: Duration) -> impl Future<Output = ()> + use<> {
        let streams = self.clone();
        let mut open = self.0.open.subscribe();
        async move {
            loop {
                if open.wait_for(|count| count.open > 0).await.is_err() {
                    // The connection's service is gone: no stream will open again.
                    return std::future::pending().await;
                }
                let now = Instant::now();
                let check_again = match streams.stalled_at(timeout) {
                    Some(at) if at <= now => return,
                    Some(at) => at,
                    // A stream that starts waiting from now on cannot have waited
                    // `timeout` before now + timeout...
                    None => instant_after(now, timeout),
                };
                // ...but a stream that closes may leave only waiting ones: look
                // again then too.
                tokio::select! {
                    () = tokio::time::sleep_until(check_again) => {}
                    _ = open.changed() => {}
                }
            }
        }
    }

    /// When the connection counts as stalled, as [`stalled_until`] says of its open
    /// streams now.
    fn stalled_at(&self, timeout: Duration) -> Option<Instant> {
        let origin = self.0.origin;
        let waiting = self
            .0
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let since = waiting
            .iter()
            .map(|waiting| match waiting.0.load(Ordering::Relaxed) {
                0 => None,
                since => Some(origin + Duration::from_nanos(since - 1)),
            });
        stalled_until(since, timeout)
    }
}

/// When a connection whose open streams have waited for the client since
/// `waiting_since` counts as stalled: `timeout` after the last of them started
/// waiting, or never (`None`) while one is not waiting or none is open.
fn stalled_until(
    waiting_since: impl IntoIterator<Item = Option<Instant>>,
    timeout: Duration,
) -> Option<Instant> {
    let mut last: Option<Instant> = None;
    for since in waiting_since {
        // A stream not waiting for the client: the connection is not stalled.
        let since = since?;
        last = Some(last.map_or(since, |last| last.max(since)));
    }
    // Never overflowing: a write timeout of centuries means "never stalled".
    last.map(|since| instant_after(since, timeout))
}

impl OpenStream {
    /// The stream's body handed hyper a frame: it now waits for hyper (that is,
    /// the client's flow-control window) to ask for the next.
    fn handed_a_frame(&self) {
        let since = self.streams.0.origin.elapsed().as_nanos();
        let since = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
        self.waiting.0.store(since, Ordering::Relaxed);
    }

    /// hyper asks for the next frame: the stream is not waiting for the client.
    fn asked(&self) {
        self.waiting.0.store(0, Ordering::Relaxed);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let streams = &self.streams.0;
        streams
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|waiting| !Arc::ptr_eq(waiting, &self.waiting));
        streams.open.send_modify(|count| count.open -= 1);
    }
}

pin_project! {
    /// A response body on an HTTP/2 connection: its stream is open until the body
    /// ends or hyper drops it, and marked waiting for the client between handing
    /// hyper a frame and being asked for the next.
    pub(crate) struct StreamBody<B> {
        #[pin]
        inner: B,
        stream: Option<OpenStream>,
    }
}

impl<B> StreamBody<B> {
    pub(crate) fn new(inner: B, stream: OpenStream) -> Self {
        StreamBody {
            inner,
            stream: Some(stream),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for StreamBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(stream) = this.stream.as_ref() {
            stream.asked();
        }
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(stream) = this.stream.as_ref() {
                    stream.handed_a_frame();
                }
            }
            // The end: the stream closes now rather than when hyper gets round to
            // dropping the body.
            Poll::Ready(None | Some(Err(_))) => drop(this.stream.take()),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio::sync::mpsc;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    /// A response body whose frames the test sends: pending while none is sent
    /// (the provider is silent), ended when the sender is dropped.
    struct Provider(mpsc::UnboundedReceiver<Bytes>);

    impl Body for Provider {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|frame| frame.map(|b| Ok(Frame::data(b))))
        }
    }

    /// A stream on `streams` and the sender of its provider's frames.
    fn stream(streams: &OpenStreams) -> (StreamBody<Provider>, mpsc::UnboundedSender<Bytes>) {
        let (send, receive) = mpsc::unbounded_channel();
        (StreamBody::new(Provider(receive), streams.open()), send)
    }

    /// hyper asks the body for its next frame: `Some(true)` a frame, `Some(false)`
    /// the end, `None` nothing yet.
    fn ask(body: &mut StreamBody<Provider>) -> Option<bool> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(_))) => Some(true),
            Poll::Ready(None) => Some(false),
            Poll::Pending => None,
        }
    }

    /// Whether `stalled` resolves within ten minutes.
    async fn stalls_within_ten_minutes(stalled: impl Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_secs(600), stalled)
            .await
            .is_ok()
    }

    #[test]
    fn a_connection_is_stalled_only_when_every_open_stream_waits_for_the_client() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        assert_eq!(stalled_until([], TIMEOUT), None);
        assert_eq!(stalled_until([None], TIMEOUT), None);
        assert_eq!(stalled_until([Some(t0), None], TIMEOUT), None);
        assert_eq!(stalled_until([Some(t0)], TIMEOUT), Some(t0 + TIMEOUT));
        assert_eq!(
            stalled_until([Some(later), Some(t0)], TIMEOUT),
            Some(later + TIMEOUT)
        );
    }

    /// `--write-timeout 10000000000000000000s`: the instants are capped at a century
    /// instead of overflowing the clock.
    #[test]
    fn a_write_timeout_past_a_century_stalls_a_connection_a_century_later() {
        let t0 = Instant::now();
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        let century = backstop_classify::MAX_INSTANT_DELAY;
        assert_eq!(stalled_until([Some(t0)], huge), Some(t0 + century));
        assert_eq!(stalled_until([Some(t0)], Duration::MAX), Some(t0 + century));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_timeout_past_a_century_never_stalls_a_connection_sooner() {
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        let streams = OpenStreams::default();
        let (mut body, provider) = stream(&streams);
        // Open and asked for nothing yet: the look again is "a century from now".
        assert!(!stalls_within_ten_minutes(streams.stalled_for(huge)).await);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        assert_eq!(ask(&mut body), Some(true));
        assert!(!stalls_within_ten_minutes(streams.stalled_for(huge)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_frame_the_client_never_takes_stalls_its_connection_at_the_timeout() {
        let streams = OpenStreams::default();
        let (mut body, provider) = stream(&streams);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let handed = Instant::now();
        assert_eq!(ask(&mut body), Some(true));
        // hyper never asks again: the client's window stays closed.
        streams.stalled_for(TIMEOUT).await;
        assert_eq!(handed.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_for_its_provider_never_stalls_its_connection() {
        let streams = OpenStreams::default();
        let (mut body, provider) = stream(&streams);
        // Not yet asked for anything (the response is being made).
        assert!(!stalls_within_ten_minutes(streams.stalled_for(TIMEOUT)).await);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        assert_eq!(ask(&mut body), Some(true));
        // Asked again 59 s later: the client took the frame; the provider is silent.
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(ask(&mut body), None);
        assert!(!stalls_within_ten_minutes(streams.stalled_for(TIMEOUT)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn one_stream_not_waiting_for_the_client_keeps_the_connection_until_it_ends() {
        let streams = OpenStreams::default();
        let (mut unread, provider) = stream(&streams);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        assert_eq!(ask(&mut unread), Some(true));
        let (mut silent, silent_provider) = stream(&streams);
        assert_eq!(ask(&mut silent), None);
        let stalled = streams.stalled_for(TIMEOUT);
        let mut stalled = std::pin::pin!(stalled);
        assert!(!stalls_within_ten_minutes(stalled.as_mut()).await);
        // The silent stream ends: the one left has waited for the client for ten
        // minutes, so the connection is stalled at once.
        drop(silent_provider);
        assert_eq!(ask(&mut silent), Some(false));
        let ended = Instant::now();
        stalled.await;
        assert_eq!(ended.elapsed(), Duration::ZERO);
        drop(unread);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_opens_and_closes_between_two_looks_restarts_the_idle_clock() {
        let streams = OpenStreams::default();
        let idle = streams.idle_for(TIMEOUT);
        let mut idle = std::pin::pin!(idle);
        let started = Instant::now();
        let early = Duration::from_secs(40);
        assert!(tokio::time::timeout(early, idle.as_mut()).await.is_err());
        // A request answered at once: the idle timer's task never sees it open.
        drop(streams.open());
        idle.await;
        assert_eq!(started.elapsed(), early + TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_no_open_stream_never_stalls() {
        let streams = OpenStreams::default();
        assert!(!stalls_within_ten_minutes(streams.stalled_for(TIMEOUT)).await);
        let (mut body, provider) = stream(&streams);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        drop(provider);
        assert_eq!(ask(&mut body), Some(true));
        assert_eq!(ask(&mut body), Some(false));
        assert!(!stalls_within_ten_minutes(streams.stalled_for(TIMEOUT)).await);
    }
}
