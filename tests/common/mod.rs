//! Shared by the hardening tests (`chaos_soak`, `secrets`, `bounded_memory`): a
//! transport wrapper that records every byte the provider sent, and a seedable
//! random source.
//!
//! `rand` is not a dependency of the root package (whose manifest is shared with
//! the workspace), so the random source is a SplitMix64: seeded, reproducible,
//! and good enough to pick faults and shapes of requests.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tower::Service;

/// A seeded SplitMix64 generator (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is irrelevant at these sizes.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `true` with probability `percent / 100`.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the provider sent for one attempt, as far as it was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SentResponse {
    /// The response status.
    pub status: u16,
    /// Every data byte pulled from the provider's body, in order.
    pub bytes: Vec<u8>,
    /// The provider's body ended cleanly (not dropped, not failed).
    pub ended: bool,
    /// The provider's body failed while being read.
    pub failed: bool,
}

/// The provider's responses by the sequence number in their
/// `x-request-id: req_mock_<seq>` header.
#[derive(Clone, Debug, Default)]
pub struct SentLog(Arc<Mutex<HashMap<u64, SentResponse>>>);

impl SentLog {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<u64, SentResponse>) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// What the provider sent for attempt `seq`, if it answered with a head.
    pub fn get(&self, seq: u64) -> Option<SentResponse> {
        self.with(|m| m.get(&seq).cloned())
    }

    /// How many responses are recorded.
    pub fn len(&self) -> usize {
        self.with(|m| m.len())
    }

    /// Forgets everything recorded (between soak rounds, to bound memory).
    pub fn clear(&self) {
        self.with(HashMap::clear);
    }
}

/// The sequence number in a mock response's `x-request-id: req_mock_<seq>`.
pub fn mock_seq(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get("x-request-id")?
        .to_str()
        .ok()?
        .strip_prefix("req_mock_")?
        .parse()
        .ok()
}

/// Sits between the classify layer and the provider and records, per attempt, the
/// exact bytes the provider's body yielded: the reference against which what the
/// caller received is compared.
#[derive(Clone, Debug)]
pub struct RecordingTransport<S> {
    inner: S,
    sent: SentLog,
}

impl<S> RecordingTransport<S> {
    /// Records what `inner` sends into `sent`.
    pub fn new(inner: S, sent: SentLog) -> Self {
        RecordingTransport { inner, sent }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<Request<B>> for RecordingTransport<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = io::Error>,
    S::Future: Send + 'static,
    RB: Body<Data = Bytes, Error = io::Error> + Unpin + Send + 'static,
{
    type Response = Response<RecordingBody<RB>>;
    type Error = io::Error;
    type Future = BoxFuture<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let call = self.inner.call(request);
        let sent = self.sent.clone();
        Box::pin(async move {
            let response = call.await?;
            let seq = mock_seq(response.headers());
            if let Some(seq) = seq {
                let status = response.status().as_u16();
                // An empty body may never be polled: it has ended already.
                let ended = response.body().is_end_stream();
                sent.with(|m| {
                    m.insert(
                        seq,
                        SentResponse {
                            status,
                            ended,
                            ..SentResponse::default()
                        },
                    )
                });
            }
            Ok(response.map(|inner| RecordingBody { inner, seq, sent }))
        })
    }
}

/// A provider body that copies each data frame into the [`SentLog`] as it passes.
#[derive(Debug)]
pub struct RecordingBody<B> {
    inner: B,
    seq: Option<u64>,
    sent: SentLog,
}

impl<B> Body for RecordingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(result), Some(seq)) = (&polled, this.seq) {
            this.sent.with(|m| {
                if let Some(entry) = m.get_mut(&seq) {
                    match result {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                entry.bytes.extend_from_slice(data);
                            }
                            // A full body says it has ended without a further poll.
                            entry.ended |= this.inner.is_end_stream();
                        }
                        Some(Err(_)) => entry.failed = true,
                        None => entry.ended = true,
                    }
                }
            });
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
