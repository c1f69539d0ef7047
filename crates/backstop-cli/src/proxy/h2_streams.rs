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
//! a few KiB). [`OpenStreams::watch_client`] resolves once every open stream has
//! waited for the client for the whole timeout: the client has taken nothing on
//! this connection for that long, and the connection is closed, which drops its
//! streams and the upstream requests behind them. A stream waiting for its provider
//! (a reasoning model silent for minutes) is not waiting for the client, and keeps
//! its connection open.
//!
//! One stream left unread beside streams that are read (an SDK that abandoned a
//! stream object) is cut alone by [`OpenStreams::watch_client`] once it has waited for
//! the client for the same timeout: its response body, which the stream's
//! [`StreamBody`] shares with the connection, is dropped, and with it the upstream
//! request behind it (the provider call, its in-flight slot, what the body held).
//! hyper gives no way to reset a stream whose body it is not polling, so the stream
//! itself stays open until hyper polls its body again (the client released window):
//! that poll is an error, and hyper resets the stream (RST_STREAM). The client gets
//! no byte made after the cut (the frame hyper already held may still go out) and
//! never a clean end. Until then the cut stream still counts as waiting for the
//! client: left alone on its connection, it stalls it. When a stream is due to be
//! cut at the very instant its connection stalls (it was the last open stream to
//! start waiting), the connection's close wins and no cut is counted.
//!
//! [`WriteTimeout`]: super::write_timeout::WriteTimeout

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::instant_after;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
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

/// What the connection knows of one open stream: since when it has waited for the
/// client, and its response body, which [`OpenStreams::watch_client`] may drop.
#[derive(Default)]
struct Waiting {
    /// Since when the stream has waited for the client: nanoseconds after the
    /// connection's origin, plus one; zero while it is not waiting. Stored under
    /// the body's lock, so that a cut sees the mark the stream's last poll left.
    since: AtomicU64,
    /// The stream's response body, once it is made.
    body: OnceLock<Arc<dyn Cut>>,
    /// Whether the body was cut (the cutter skips it from then on).
    cut: AtomicBool,
}

/// A stream's response body, held by the stream (which polls it) and by its
/// connection (which may drop it), behind a lock.
trait Cut: Send + Sync {
    /// Drops the body, unless it is gone already or `still` (checked under the
    /// body's lock) is false; whether it dropped it.
    fn cut_if(&self, still: &dyn Fn() -> bool) -> bool;
}

impl<B: Send> Cut for Mutex<Option<B>> {
    fn cut_if(&self, still: &dyn Fn() -> bool) -> bool {
        let mut slot = self.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() || !still() {
            return false;
        }
        let body = slot.take();
        drop(slot);
        // Dropped outside the lock: the stream's next poll never waits for the
        // upstream request's teardown.
        drop(body);
        true
    }
}

impl Waiting {
    /// The stream's mark, or zero once its body was cut: what the cutter judges.
    fn cuttable_mark(&self) -> u64 {
        if self.cut.load(Ordering::Relaxed) {
            0
        } else {
            self.since.load(Ordering::Relaxed)
        }
    }

    /// Drops the stream's body if the stream still waits since `mark`: hyper has
    /// not asked for a frame since the cutter judged it. Whether it did.
    fn cut_if_still_waiting_since(&self, mark: u64) -> bool {
        let Some(body) = self.body.get() else {
            return false;
        };
        let cut = body.cut_if(&|| self.since.load(Ordering::Relaxed) == mark);
        if cut {
            self.cut.store(true, Ordering::Relaxed);
        }
        cut
    }
}

/// The instant a [`Waiting`] mark stands for, on a connection that started at
/// `origin`: `None` for a stream not waiting for the client.
fn waiting_since(origin: Instant, mark: u64) -> Option<Instant> {
    match mark {
        0 => None,
        since => Some(origin + Duration::from_nanos(since - 1)),
    }
}

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

    /// Watches the client of this connection with the write timeout `timeout`:
    /// resolves once at least one stream is open and every open stream has waited
    /// for the client that long (the connection is stalled: it is to be closed);
    /// until then, cuts each stream that has waited that long alone, and calls
    /// `on_cut` for each: drops the stream's response body (which cancels the
    /// upstream request behind it), so that hyper's next poll of the stream, if the
    /// client ever releases window, is an error and resets it. A stream waiting for
    /// its provider is never cut.
    ///
    /// Both are judged at one reading of the clock, the stall first: a stream due
    /// to be cut at the instant its connection stalls (a stream left unread alone
    /// on its connection) is not cut, the connection's close is what happens.
    pub(crate) fn watch_client<F: FnMut()>(
        &self,
        timeout: Duration,
        on_cut: F,
    ) -> impl Future<Output = ()> + use<F> {
        self.watch(timeout, true, Some(on_cut))
    }

    /// [`watch_client`](Self::watch_client) without the cuts.
    #[cfg(test)]
    fn stalled_for(&self, timeout: Duration) -> impl Future<Output = ()> + use<> {
        self.watch(timeout, true, None::<fn()>)
    }

    /// The watcher's loop while a stream is open: look at the streams now, then
    /// again when the next stream is due to stall the connection or be cut, or
    /// sooner if a stream opens or closes (one that closes may leave only waiting
    /// ones). Pending for ever once the connection's service is gone: no stream
    /// will open again.
    fn watch<F: FnMut()>(
        &self,
        timeout: Duration,
        close_when_stalled: bool,
        mut on_cut: Option<F>,
    ) -> impl Future<Output = ()> + use<F> {
        let streams = self.clone();
        let mut open = self.0.open.subscribe();
        async move {
            loop {
                if open.wait_for(|count| count.open > 0).await.is_err() {
                    return std::future::pending().await;
                }
                let now = Instant::now();
                // A stream that starts waiting from now on cannot have waited
                // `timeout` before now + timeout.
                let mut check_again = instant_after(now, timeout);
                if close_when_stalled {
                    match streams.stalled_at(timeout) {
                        Some(at) if at <= now => return,
                        Some(at) => check_again = check_again.min(at),
                        None => {}
                    }
                }
                if let Some(on_cut) = on_cut.as_mut() {
                    let (cut, at) = streams.cut_due(timeout, now);
                    for _ in 0..cut {
                        on_cut();
                    }
                    check_again = check_again.min(at);
                }
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
            .map(|waiting| waiting_since(origin, waiting.since.load(Ordering::Relaxed)));
        stalled_until(since, timeout)
    }

    /// Cuts the open streams that [`unread_due`] says are due at `now`, unless
    /// hyper asked one for a frame since; how many it cut, and when to look again.
    fn cut_due(&self, timeout: Duration, now: Instant) -> (usize, Instant) {
        let origin = self.0.origin;
        let (due, check_again) = {
            let waiting = self
                .0
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let marks = waiting.iter().map(|waiting| {
                let mark = waiting.cuttable_mark();
                ((waiting, mark), waiting_since(origin, mark))
            });
            let (due, check_again) = unread_due(marks, timeout, now);
            let due: Vec<(Arc<Waiting>, u64)> = due
                .into_iter()
                .map(|(waiting, mark)| (Arc::clone(waiting), mark))
                .collect();
            (due, check_again)
        };
        // Cut with the streams' list unlocked: dropping a body may take a while.
        let cut = due
            .iter()
            .filter(|(waiting, mark)| waiting.cut_if_still_waiting_since(*mark))
            .count();
        (cut, check_again)
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

/// Which of the open `streams`, each with since when it has waited for the client
/// (`None`: not waiting, or cut already), have waited `timeout` at `now`, and
/// when the first of the others will have: `timeout` from now at the latest, since
/// a stream that starts waiting from now on cannot have waited `timeout` before.
fn unread_due<S>(
    streams: impl IntoIterator<Item = (S, Option<Instant>)>,
    timeout: Duration,
    now: Instant,
) -> (Vec<S>, Instant) {
    let mut due = Vec::new();
    let mut check_again = instant_after(now, timeout);
    for (stream, since) in streams {
        let Some(since) = since else { continue };
        // Never overflowing: a write timeout of centuries means "never cut".
        let at = instant_after(since, timeout);
        if at <= now {
            due.push(stream);
        } else {
            check_again = check_again.min(at);
        }
    }
    (due, check_again)
}

impl OpenStream {
    /// The stream's body handed hyper a frame: it now waits for hyper (that is,
    /// the client's flow-control window) to ask for the next.
    fn handed_a_frame(&self) {
        let since = self.streams.0.origin.elapsed().as_nanos();
        let since = u64::try_from(since).unwrap_or(u64::MAX - 1) + 1;
        self.waiting.since.store(since, Ordering::Relaxed);
    }

    /// hyper asks for the next frame: the stream is not waiting for the client.
    fn asked(&self) {
        self.waiting.since.store(0, Ordering::Relaxed);
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

/// The error a cut stream's body ends with: hyper resets the stream.
#[derive(Debug)]
pub(crate) struct StreamCut;

impl fmt::Display for StreamCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the client left this stream unread for the write timeout; its upstream request was dropped",
        )
    }
}

impl std::error::Error for StreamCut {}

/// A response body on an HTTP/2 connection: its stream is open until the body ends
/// or hyper drops it, and marked waiting for the client between handing hyper a
/// frame and being asked for the next. The inner body is shared with the
/// connection, which drops it once the stream has waited for the client for the
/// write timeout ([`OpenStreams::watch_client`]); the next poll is then an error.
pub(crate) struct StreamBody<B> {
    /// `None` once cut. Locked for each poll: uncontended but for a cut.
    inner: Arc<Mutex<Option<B>>>,
    stream: Option<OpenStream>,
}

impl<B: Send + 'static> StreamBody<B> {
    pub(crate) fn new(inner: B, stream: OpenStream) -> Self {
        let inner = Arc::new(Mutex::new(Some(inner)));
        // An open stream gets one body: this never finds one set already.
        let _ = stream.waiting.body.set(inner.clone());
        StreamBody {
            inner,
            stream: Some(stream),
        }
    }
}

impl<B> Body for StreamBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: From<StreamCut>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let mut inner = this.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(body) = inner.as_mut() else {
            drop(inner);
            // Cut: hyper resets the stream, which closes now.
            drop(this.stream.take());
            return Poll::Ready(Some(Err(StreamCut.into())));
        };
        // The marks are set under the body's lock: a cut judges the last one.
        if let Some(stream) = this.stream.as_ref() {
            stream.asked();
        }
        let polled = Pin::new(body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(stream) = this.stream.as_ref() {
                    stream.handed_a_frame();
                }
                false
            }
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Pending => false,
        };
        drop(inner);
        if ended {
            // The end: the stream closes now rather than when hyper gets round to
            // dropping the body.
            drop(this.stream.take());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // A cut body is not a clean end.
        inner.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use backstop_classify::BoxError;
    use tokio::sync::mpsc;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    /// A response body whose frames the test sends: pending while none is sent
    /// (the provider is silent), ended when the sender is dropped.
    struct Provider(mpsc::UnboundedReceiver<Bytes>);

    impl Body for Provider {
        type Data = Bytes;
        type Error = BoxError;

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
            Poll::Ready(Some(Err(error))) => panic!("the body failed: {error}"),
            Poll::Pending => None,
        }
    }

    /// hyper asks the body for its next frame, which must be an error: what it says.
    fn ask_for_an_error(body: &mut StreamBody<Provider>) -> String {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(body).poll_frame(&mut cx) {
            Poll::Ready(Some(Err(error))) => error.to_string(),
            Poll::Ready(Some(Ok(_))) => panic!("a frame"),
            Poll::Ready(None) => panic!("a clean end"),
            Poll::Pending => panic!("nothing yet"),
        }
    }

    /// The instants at which `streams`' cutter (on a `TIMEOUT`) cuts a stream.
    type Cuts = Arc<Mutex<Vec<Instant>>>;

    fn cutter(streams: &OpenStreams) -> (impl Future<Output = ()> + use<>, Cuts) {
        watching(streams, false)
    }

    /// The connection's watcher on `streams` (`close_when_stalled`, as
    /// [`OpenStreams::watch_client`]; otherwise it only cuts, and never ends), and
    /// the instants of its cuts.
    fn watching(
        streams: &OpenStreams,
        close_when_stalled: bool,
    ) -> (impl Future<Output = ()> + use<>, Cuts) {
        let cuts = Cuts::default();
        let seen = cuts.clone();
        let on_cut = move || seen.lock().unwrap().push(Instant::now());
        (
            streams.watch(TIMEOUT, close_when_stalled, Some(on_cut)),
            cuts,
        )
    }

    /// Runs `cutter` (which never ends) for `time`.
    async fn run_for(cutter: Pin<&mut impl Future<Output = ()>>, time: Duration) {
        assert!(tokio::time::timeout(time, cutter).await.is_err());
    }

    fn cuts(cuts: &Cuts) -> Vec<Instant> {
        cuts.lock().unwrap().clone()
    }

    const ONE_NS: Duration = Duration::from_nanos(1);
    const TEN_MINUTES: Duration = Duration::from_secs(600);

    #[test]
    fn a_stream_is_due_to_be_cut_once_it_has_waited_the_timeout_and_not_a_nanosecond_before() {
        let t0 = Instant::now();
        let at = t0 + TIMEOUT;
        let none: Vec<&str> = Vec::new();
        assert_eq!(
            unread_due([("a", Some(t0))], TIMEOUT, at - ONE_NS),
            (none.clone(), at)
        );
        assert_eq!(
            unread_due([("a", Some(t0))], TIMEOUT, at),
            (vec!["a"], at + TIMEOUT)
        );
        // Not waiting for the client (or cut already): never due; the next look is a
        // timeout from now, as when no stream is open.
        assert_eq!(
            unread_due([("a", None)], TIMEOUT, at),
            (none.clone(), at + TIMEOUT)
        );
        assert_eq!(unread_due(Vec::<(&str, _)>::new(), TIMEOUT, t0), (none, at));
    }

    #[test]
    fn only_the_streams_that_have_waited_the_timeout_are_due_and_the_next_look_is_the_first_of_the_others()
     {
        let s = Duration::from_secs;
        let earliest = Instant::now();
        let t0 = earliest + s(10);
        let streams = [
            ("waited", Some(t0)),
            ("reading", None),
            ("later", Some(t0 + s(20))),
            ("waited longer", Some(earliest)),
            ("soon", Some(t0 + s(5))),
        ];
        assert_eq!(
            unread_due(streams, TIMEOUT, t0 + TIMEOUT),
            (vec!["waited", "waited longer"], t0 + s(5) + TIMEOUT)
        );
        // A century-long timeout: capped, never overflowing.
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        let century = backstop_classify::MAX_INSTANT_DELAY;
        let none: Vec<&str> = Vec::new();
        assert_eq!(
            unread_due([("a", Some(t0))], huge, t0 + TIMEOUT),
            (none, t0 + century)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_left_unread_for_the_timeout_is_cut_then_and_its_next_poll_is_an_error() {
        let streams = OpenStreams::default();
        let (mut unread, provider) = stream(&streams);
        let (mut read, read_provider) = stream(&streams);
        let (cutter, cut_at) = cutter(&streams);
        let mut cutter = std::pin::pin!(cutter);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let handed = Instant::now();
        assert_eq!(ask(&mut unread), Some(true));
        // hyper never asks `unread` again; it takes `read`'s frames as they come.
        for _ in 0..59 {
            read_provider
                .send(Bytes::from_static(b"data: r\n\n"))
                .unwrap();
            assert_eq!(ask(&mut read), Some(true));
            run_for(cutter.as_mut(), Duration::from_secs(1)).await;
            assert_eq!(ask(&mut read), None);
        }
        run_for(
            cutter.as_mut(),
            TIMEOUT - Duration::from_secs(59) - Duration::from_millis(1),
        )
        .await;
        assert_eq!(cuts(&cut_at), []);
        assert!(!provider.is_closed(), "the body was dropped early");
        run_for(cutter.as_mut(), Duration::from_millis(1)).await;
        assert_eq!(cuts(&cut_at), [handed + TIMEOUT]);
        // The body is dropped (and with it the upstream request): its provider's
        // channel is closed. hyper's next poll is an error, never a frame sent
        // after the cut nor a clean end.
        assert!(provider.is_closed());
        provider
            .send(Bytes::from_static(b"data: 2\n\n"))
            .unwrap_err();
        assert!(!unread.is_end_stream());
        assert!(ask_for_an_error(&mut unread).contains("unread for the write timeout"));
        // The other stream is untouched, and nothing is cut twice.
        assert!(!read_provider.is_closed());
        read_provider
            .send(Bytes::from_static(b"data: r\n\n"))
            .unwrap();
        assert_eq!(ask(&mut read), Some(true));
        assert_eq!(ask(&mut read), None);
        run_for(cutter.as_mut(), TEN_MINUTES).await;
        assert_eq!(cuts(&cut_at), [handed + TIMEOUT]);
        assert!(!read_provider.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_asked_for_its_next_frame_before_the_timeout_is_not_cut() {
        let streams = OpenStreams::default();
        let (cutter, cut_at) = cutter(&streams);
        let mut cutter = std::pin::pin!(cutter);
        // Both hand a frame, and are asked again 59 s later: the client took it.
        let (mut silent, silent_provider) = stream(&streams);
        let (mut busy, busy_provider) = stream(&streams);
        silent_provider
            .send(Bytes::from_static(b"data: 1\n\n"))
            .unwrap();
        busy_provider
            .send(Bytes::from_static(b"data: 1\n\n"))
            .unwrap();
        assert_eq!(ask(&mut silent), Some(true));
        assert_eq!(ask(&mut busy), Some(true));
        run_for(cutter.as_mut(), Duration::from_secs(59)).await;
        // `silent`'s provider has nothing yet; `busy` hands its next frame, which the
        // client never takes: it waits for the client from now on.
        assert_eq!(ask(&mut silent), None);
        busy_provider
            .send(Bytes::from_static(b"data: 2\n\n"))
            .unwrap();
        let handed = Instant::now();
        assert_eq!(ask(&mut busy), Some(true));
        run_for(cutter.as_mut(), TEN_MINUTES).await;
        assert_eq!(cuts(&cut_at), [handed + TIMEOUT]);
        assert!(busy_provider.is_closed());
        assert!(!silent_provider.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_for_its_provider_is_never_cut() {
        let streams = OpenStreams::default();
        let (cutter, cut_at) = cutter(&streams);
        let mut cutter = std::pin::pin!(cutter);
        // Open, its response still being made.
        let making = streams.open();
        // Asked for its first frame, which the provider has not sent.
        let (mut silent, silent_provider) = stream(&streams);
        assert_eq!(ask(&mut silent), None);
        run_for(cutter.as_mut(), TEN_MINUTES).await;
        assert_eq!(cuts(&cut_at), []);
        assert!(!silent_provider.is_closed());
        silent_provider
            .send(Bytes::from_static(b"data: 1\n\n"))
            .unwrap();
        assert_eq!(ask(&mut silent), Some(true));
        drop(making);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_asked_again_between_the_cutters_look_and_its_cut_is_not_cut() {
        let streams = OpenStreams::default();
        let (mut body, provider) = stream(&streams);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        assert_eq!(ask(&mut body), Some(true));
        let waiting = streams.0.waiting.lock().unwrap()[0].clone();
        let judged = waiting.cuttable_mark();
        tokio::time::sleep(TIMEOUT).await;
        // The client took the frame just as the cutter looked.
        provider.send(Bytes::from_static(b"data: 2\n\n")).unwrap();
        assert_eq!(ask(&mut body), Some(true));
        assert!(!waiting.cut_if_still_waiting_since(judged));
        assert!(!provider.is_closed());
        // The mark it leaves is the one a cut must name.
        assert!(waiting.cut_if_still_waiting_since(waiting.cuttable_mark()));
        assert!(provider.is_closed());
        assert_eq!(waiting.cuttable_mark(), 0);
        assert!(!waiting.cut_if_still_waiting_since(waiting.since.load(Ordering::Relaxed)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_stream_left_alone_on_its_connection_stalls_it() {
        let streams = OpenStreams::default();
        let (cutter, cut_at) = cutter(&streams);
        let mut cutter = std::pin::pin!(cutter);
        let (mut unread, provider) = stream(&streams);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        assert_eq!(ask(&mut unread), Some(true));
        let making = streams.open();
        run_for(cutter.as_mut(), TIMEOUT).await;
        assert_eq!(cuts(&cut_at).len(), 1);
        // Still open, still waiting for the client: once the other stream closes,
        // the client has taken nothing on this connection for the timeout.
        drop(making);
        let closed = Instant::now();
        streams.stalled_for(TIMEOUT).await;
        assert_eq!(closed.elapsed(), Duration::ZERO);
        drop(unread);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_left_unread_alone_stalls_its_connection_and_is_not_cut() {
        // The connection's watcher: a stream due to be cut at the instant its
        // connection stalls is not cut; the connection's close is what happens.
        let streams = OpenStreams::default();
        let (watcher, cuts) = watching(&streams, true);
        let mut watcher = std::pin::pin!(watcher);
        let (mut unread, provider) = stream(&streams);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        let handed = Instant::now();
        assert_eq!(ask(&mut unread), Some(true));
        assert!(
            tokio::time::timeout(TIMEOUT - Duration::from_millis(1), watcher.as_mut())
                .await
                .is_err()
        );
        watcher.await;
        assert_eq!(handed.elapsed(), TIMEOUT);
        assert_eq!(cuts.lock().unwrap().len(), 0);
        // Not cut: its body is still there (the provider's next frame goes through
        // once hyper asks).
        provider.send(Bytes::from_static(b"data: 2\n\n")).unwrap();
        assert_eq!(ask(&mut unread), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn the_connections_watcher_cuts_a_stream_left_unread_beside_one_read() {
        let streams = OpenStreams::default();
        let (watcher, cuts) = watching(&streams, true);
        let mut watcher = std::pin::pin!(watcher);
        let (mut unread, provider) = stream(&streams);
        // The other stream waits for its provider: not for the client.
        let (_read, _read_provider) = stream(&streams);
        provider.send(Bytes::from_static(b"data: 1\n\n")).unwrap();
        let handed = Instant::now();
        assert_eq!(ask(&mut unread), Some(true));
        run_for(watcher.as_mut(), TEN_MINUTES).await;
        assert_eq!(cuts.lock().unwrap().clone(), vec![handed + TIMEOUT]);
        assert!(ask_for_an_error(&mut unread).contains("unread"));
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
