//! Classifying errors that happened before any response arrived.

use std::error::Error;
use std::io;

use crate::{ClassifiedError, Failure, FailureKind};

/// How deep the source chain is followed: real chains are a handful of links deep;
/// the bound keeps a pathological (or cyclic) chain from looping forever.
const MAX_CHAIN: usize = 32;

/// Classifies a transport error by walking its source chain, outermost first, and
/// stopping at the first link that decides:
///
/// | link | kind |
/// |---|---|
/// | a [`ClassifiedError`] (an inner layer already decided) | its failure, unchanged |
/// | `hyper_util` legacy client error with `is_connect()` | [`FailureKind::ConnectFailed`] |
/// | `io::Error` `ConnectionRefused`, `NotFound`, `AddrNotAvailable`, `HostUnreachable`, `NetworkUnreachable` | [`FailureKind::ConnectFailed`] |
/// | `io::Error` `ConnectionReset`, `ConnectionAborted`, `BrokenPipe`, `UnexpectedEof`, `NotConnected` | [`FailureKind::ConnectionLost`] |
/// | `io::Error` `TimedOut`, `tokio::time::error::Elapsed`, `tower::timeout::error::Elapsed`, a hyper timeout | [`FailureKind::TimedOut`] |
/// | `hyper::Error` incomplete message, closed or canceled | [`FailureKind::ConnectionLost`] |
/// | anything else | [`FailureKind::ConnectionLost`] |
///
/// The connect check comes first because a connect error wraps the io error that
/// caused it, and a connect *timeout* still proves the request was never sent.
///
/// An unknown error is [`FailureKind::ConnectionLost`], whose verdict is
/// [`Retryable::IfIdempotent`](crate::Retryable::IfIdempotent): without proof that
/// the request never left, it may have reached the provider and been billed, so it is
/// retried only when the request is idempotent. Calling it `ConnectFailed` would risk
/// a duplicate completion; calling it non-retryable would give up on idempotent
/// requests that a retry would save.
///
/// ```
/// use backstop_classify::{classify_transport_error, FailureKind};
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert_eq!(classify_transport_error(&refused).kind, FailureKind::ConnectFailed);
/// ```
pub fn classify_transport_error(err: &(dyn Error + 'static)) -> Failure {
    let mut link: Option<&(dyn Error + 'static)> = Some(err);
    for _ in 0..MAX_CHAIN {
        let Some(current) = link else {
            break;
        };
        if let Some(decided) = decide(current) {
            return decided;
        }
        link = current.source();
    }
    Failure::new(FailureKind::ConnectionLost)
}

/// The verdict of one link, if it decides.
fn decide(link: &(dyn Error + 'static)) -> Option<Failure> {
    if let Some(classified) = link.downcast_ref::<ClassifiedError>() {
        return Some(classified.failure().clone());
    }
    if let Some(client) = link.downcast_ref::<hyper_util::client::legacy::Error>() {
        if client.is_connect() {
            return Some(Failure::new(FailureKind::ConnectFailed));
        }
        return None;
    }
    if link.is::<tokio::time::error::Elapsed>() || link.is::<tower::timeout::error::Elapsed>() {
        return Some(Failure::new(FailureKind::TimedOut));
    }
    if let Some(io) = link.downcast_ref::<io::Error>() {
        return io_kind(io).map(Failure::new);
    }
    if let Some(hyper) = link.downcast_ref::<hyper::Error>() {
        if hyper.is_timeout() {
            return Some(Failure::new(FailureKind::TimedOut));
        }
        if hyper.is_incomplete_message() || hyper.is_closed() || hyper.is_canceled() {
            return Some(Failure::new(FailureKind::ConnectionLost));
        }
    }
    None
}

fn io_kind(io: &io::Error) -> Option<FailureKind> {
    use io::ErrorKind::*;
    match io.kind() {
        ConnectionRefused | NotFound | AddrNotAvailable | HostUnreachable | NetworkUnreachable => {
            Some(FailureKind::ConnectFailed)
        }
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected => {
            Some(FailureKind::ConnectionLost)
        }
        TimedOut => Some(FailureKind::TimedOut),
        // `io::Error::source` skips a custom error's own payload (it returns the
        // payload's source), so look at the payload itself here.
        _ => io.get_ref().and_then(|inner| {
            let inner: &(dyn Error + 'static) = inner;
            decide(inner)
                .map(|f| f.kind)
                .or_else(|| inner.source().and_then(decide).map(|f| f.kind))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Retryable;

    #[derive(Debug)]
    struct Wrapper(Box<dyn Error + Send + Sync + 'static>);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[derive(Debug)]
    struct Opaque;
    impl std::fmt::Display for Opaque {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("opaque")
        }
    }
    impl Error for Opaque {}

    fn kind_of(err: &(dyn Error + 'static)) -> FailureKind {
        classify_transport_error(err).kind
    }

    #[test]
    fn io_kinds_map_to_connect_lost_and_timeout() {
        use io::ErrorKind::*;
        for (io_kind, want) in [
            (ConnectionRefused, FailureKind::ConnectFailed),
            (NotFound, FailureKind::ConnectFailed),
            (AddrNotAvailable, FailureKind::ConnectFailed),
            (ConnectionReset, FailureKind::ConnectionLost),
            (ConnectionAborted, FailureKind::ConnectionLost),
            (BrokenPipe, FailureKind::ConnectionLost),
            (UnexpectedEof, FailureKind::ConnectionLost),
            (TimedOut, FailureKind::TimedOut),
        ] {
            assert_eq!(kind_of(&io::Error::from(io_kind)), want, "{io_kind:?}");
            let wrapped = Wrapper(Box::new(io::Error::from(io_kind)));
            assert_eq!(kind_of(&wrapped), want, "wrapped {io_kind:?}");
        }
    }

    #[test]
    fn io_error_wrapping_a_custom_payload_is_looked_into() {
        let inner = io::Error::other(Wrapper(Box::new(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        ))));
        assert_eq!(kind_of(&inner), FailureKind::ConnectFailed);
    }

    #[tokio::test(start_paused = true)]
    async fn elapsed_timeouts_are_timed_out() {
        let tokio_elapsed = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            std::future::pending::<()>(),
        )
        .await
        .unwrap_err();
        assert_eq!(kind_of(&tokio_elapsed), FailureKind::TimedOut);
        let tower_elapsed = tower::timeout::error::Elapsed::new();
        assert_eq!(kind_of(&tower_elapsed), FailureKind::TimedOut);
        assert_eq!(
            kind_of(&Wrapper(Box::new(tower_elapsed))),
            FailureKind::TimedOut
        );
    }

    #[test]
    fn unknown_errors_are_connection_lost_and_retry_only_if_idempotent() {
        let failure = classify_transport_error(&Opaque);
        assert_eq!(failure.kind, FailureKind::ConnectionLost);
        assert_eq!(failure.retryable, Retryable::IfIdempotent);
        assert_eq!(
            kind_of(&io::Error::other("weird")),
            FailureKind::ConnectionLost
        );
    }

    #[test]
    fn an_inner_classified_error_keeps_its_verdict() {
        let inner = ClassifiedError::local(Failure::new(FailureKind::BreakerOpen));
        assert_eq!(kind_of(&Wrapper(Box::new(inner))), FailureKind::BreakerOpen);
    }
}
