//! Choosing HTTP/1.1 or h2c for a new connection, within a time bound.
//!
//! hyper-util's automatic builder waits for the first bytes without any timeout, so
//! a client that connects and sends nothing (or half of the HTTP/2 preface) would
//! hold its connection for ever, and hyper's header read timeout never starts. The
//! proxy reads those bytes itself, under
//! [`header_read_timeout`](super::ProxyConfig::header_read_timeout), then hands
//! them back to the chosen protocol through [`Prefixed`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The client connection preface of HTTP/2 (RFC 9113 §3.4), sent first by a client
/// speaking h2c with prior knowledge.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// The protocol the first bytes of a connection show, or `None` while they are a
/// strict prefix of the HTTP/2 preface.
pub(crate) fn detect(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Reads until [`detect`] decides; returns the protocol and the bytes read (at most
/// the preface's 24). Fails on EOF before a decision (a client that connected and
/// left). The caller bounds the time.
pub(crate) async fn read_preface<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<(Protocol, Bytes)> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    loop {
        if let Some(protocol) = detect(&first[..filled]) {
            return Ok((protocol, Bytes::copy_from_slice(&first[..filled])));
        }
        match stream.read(&mut first[filled..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
}

pin_project! {
    /// A stream whose first reads return bytes already taken from it.
    pub(crate) struct Prefixed<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.is_empty() {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn detection_needs_the_whole_preface_for_http2_and_one_odd_byte_for_http1() {
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"PRI * HTTP/2"), None);
        assert_eq!(detect(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(detect(b"POST /v1/chat"), Some(Protocol::Http1));
        assert_eq!(detect(b"PRI * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(detect(b"\x00\xff"), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn the_bytes_read_to_decide_are_read_again_first() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let (protocol, first) = read_preface(&mut server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert!(first.starts_with(b"G") && first.len() <= 24, "{first:?}");
        let mut prefixed = Prefixed::new(first, server);
        let mut head = vec![0u8; 25];
        prefixed.read_exact(&mut head).await.unwrap();
        assert_eq!(head, b"GET /healthz HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_preface_split_across_writes_is_http2_with_all_24_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move { read_preface(&mut server).await });
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(&H2_PREFACE[5..]).await.unwrap();
        client.write_all(b"frames").await.unwrap();
        let (protocol, first) = reader.await.unwrap().unwrap();
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(first, &H2_PREFACE[..]);
    }

    #[tokio::test]
    async fn a_client_leaving_before_deciding_is_an_eof() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PRI * ").await.unwrap();
        drop(client);
        let error = read_preface(&mut server).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
