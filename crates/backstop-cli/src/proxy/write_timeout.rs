//! A client that stops taking bytes: the connection's write timeout.
//!
//! A client that stops reading its response (a frozen process, an SDK that
//! abandoned a stream without closing it) leaves the proxy's writes pending: its
//! kernel keeps acknowledging zero-window probes, so TCP never gives up, and hyper
//! has no write timeout. The connection, its stream and the upstream request behind
//! it would stay open as long as the client's machine is up.
//!
//! [`WriteTimeout`] wraps a connection's I/O: a write (or flush, or shutdown) that
//! stays pending for the whole timeout fails with [`io::ErrorKind::TimedOut`] (its
//! inner error a [`WriteStalled`]), which ends the connection; hyper then drops the
//! response body, and with it the upstream request. It tells its owner through a
//! callback, since HTTP/2 keeps only the kind and text of an I/O error. The clock runs only while a
//! write is pending, and restarts from zero at every write that completes: a client
//! that reads slowly, or a stream that waits minutes for its provider, is never cut.
//! nginx's `send_timeout` is the same rule.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use backstop_classify::instant_after;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep, sleep_until};

/// Why a connection's write failed: no byte was taken for `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteStalled {
    pub(crate) after: Duration,
}

impl fmt::Display for WriteStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client took no bytes for {}",
            humantime::format_duration(self.after)
        )
    }
}

impl std::error::Error for WriteStalled {}

pin_project! {
    /// An I/O stream whose writes fail once one has been pending for `timeout`;
    /// `on_stall` is called when one does.
    pub(crate) struct WriteTimeout<S, F> {
        #[pin]
        inner: S,
        timeout: Duration,
        // Made on the first write that has to wait, then reset: one allocation per
        // connection at most, none for a client that always keeps up.
        timer: Option<Pin<Box<Sleep>>>,
        // Whether `timer` measures the write pending now.
        armed: bool,
        on_stall: F,
    }
}

impl<S, F: FnMut(WriteStalled)> WriteTimeout<S, F> {
    pub(crate) fn new(inner: S, timeout: Duration, on_stall: F) -> Self {
        WriteTimeout {
            inner,
            timeout,
            timer: None,
            armed: false,
            on_stall,
        }
    }
}

impl<S: AsyncWrite, F: FnMut(WriteStalled)> WriteTimeout<S, F> {
    /// Passes a write's result on; a pending one starts (or keeps) the clock, and
    /// fails once the clock reaches the timeout.
    fn judge<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self.project();
        let result = write(this.inner, cx);
        if result.is_ready() {
            *this.armed = false;
            return result;
        }
        if !*this.armed {
            *this.armed = true;
            // Never overflowing: any timeout is a setting, however long.
            let deadline = instant_after(Instant::now(), *this.timeout);
            match this.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => *this.timer = Some(Box::pin(sleep_until(deadline))),
            }
        }
        let timer = this.timer.as_mut().expect("armed above");
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let stalled = WriteStalled {
                    after: *this.timeout,
                };
                (this.on_stall)(stalled);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, stalled)))
            }
        }
    }
}

impl<S: AsyncRead, F> AsyncRead for WriteTimeout<S, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite, F: FnMut(WriteStalled)> AsyncWrite for WriteTimeout<S, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.judge(cx, |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.judge(cx, |inner, cx| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.judge(cx, |inner, cx| inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.judge(cx, |inner, cx| inner.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const TIMEOUT: Duration = Duration::from_secs(60);

    type Server = WriteTimeout<DuplexStream, fn(WriteStalled)>;

    /// A connection whose client side can hold 64 bytes unread; a stall panics.
    fn connection() -> (Server, DuplexStream) {
        let (server, client) = duplex(64);
        let unexpected: fn(WriteStalled) = |stalled| panic!("{stalled}");
        (WriteTimeout::new(server, TIMEOUT, unexpected), client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_never_takes_fails_at_exactly_the_timeout() {
        let (server, _client) = duplex(64);
        let mut told = Vec::new();
        let mut server = WriteTimeout::new(server, TIMEOUT, |stalled| told.push(stalled));
        let started = Instant::now();
        // 64 bytes fit in the client's buffer; the 65th waits for ever.
        let error = server.write_all(&[b'x'; 65]).await.unwrap_err();
        assert_eq!(started.elapsed(), TIMEOUT);
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(error.to_string(), "the client took no bytes for 1m");
        let payload = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<WriteStalled>());
        assert_eq!(payload, Some(&WriteStalled { after: TIMEOUT }));
        drop(server);
        assert_eq!(told, [WriteStalled { after: TIMEOUT }]);
    }

    /// `--write-timeout 10000000000000000000s`: the write's deadline is a century
    /// away instead of an overflow.
    #[tokio::test(start_paused = true)]
    async fn a_timeout_past_a_century_fails_a_stuck_write_a_century_later() {
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        let (server, _client) = duplex(64);
        let mut told = Vec::new();
        let mut server = WriteTimeout::new(server, huge, |stalled| told.push(stalled));
        let started = Instant::now();
        let error = server.write_all(&[b'x'; 65]).await.unwrap_err();
        assert_eq!(started.elapsed(), backstop_classify::MAX_INSTANT_DELAY);
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(server);
        assert_eq!(told, [WriteStalled { after: huge }]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_restarts_at_every_write_that_completes() {
        let (mut server, mut client) = connection();
        // The client takes one byte every 59 s: each wait is under the timeout,
        // their sum far over it.
        let reader = tokio::spawn(async move {
            let mut taken = Vec::new();
            let mut byte = [0u8; 1];
            while client.read_exact(&mut byte).await.is_ok() {
                taken.push(byte[0]);
                tokio::time::sleep(Duration::from_secs(59)).await;
            }
            taken
        });
        let started = Instant::now();
        let sent: Vec<u8> = (0..70).collect();
        server
            .write_all(&sent)
            .await
            .expect("every byte is taken in time");
        drop(server);
        // 64 bytes went into the buffer at once and the 65th when the client took
        // its first byte; the other five waited 59 s each, 295 s in all.
        assert_eq!(started.elapsed(), Duration::from_secs(59 * 5));
        assert_eq!(reader.await.unwrap(), sent);
    }

    #[tokio::test(start_paused = true)]
    async fn time_with_nothing_to_write_does_not_count() {
        let (mut server, mut client) = connection();
        // Filled, then the client takes it all after 59 s: no write is pending.
        server.write_all(&[b'a'; 64]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(59)).await;
        let mut first = [0u8; 64];
        client.read_exact(&mut first).await.unwrap();
        // A provider silent for ten minutes: the connection waits with no write.
        tokio::time::sleep(Duration::from_secs(600)).await;
        // Filled again and one byte more: the wait for it starts now, and the client
        // takes it after 59 s.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(59)).await;
            let mut rest = [0u8; 65];
            client.read_exact(&mut rest).await.map(|_| rest)
        });
        server.write_all(&[b'b'; 65]).await.expect("taken in time");
        assert_eq!(reader.await.unwrap().unwrap(), [b'b'; 65]);
    }

    #[tokio::test(start_paused = true)]
    async fn reads_pass_through_and_never_start_the_clock() {
        let (mut server, mut client) = connection();
        let reader = tokio::spawn(async move {
            let mut head = [0u8; 5];
            server.read_exact(&mut head).await.map(|_| head)
        });
        // The client sends its request after ten minutes.
        tokio::time::sleep(Duration::from_secs(600)).await;
        client.write_all(b"hello").await.unwrap();
        assert_eq!(&reader.await.unwrap().unwrap(), b"hello");
    }
}
