//! The decision: serve, fall back (and through which chain), or stop; and which model
//! is next. Pure functions over typed values, testable without a runtime.

use std::sync::Arc;

use backstop_classify::{Classification, FallbackRoute, Retryable};

use crate::config::Compiled;

/// What to do with one hop's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The hop succeeded (or carried no classification): return its response.
    Serve,
    /// Another model may serve: try the next one through this route.
    FallBack(FallbackRoute),
    /// The failure would happen anywhere, or falling back could duplicate a request
    /// the provider may already have accepted: return this outcome.
    Stop,
}

/// Judges one hop's outcome.
///
/// The inner stack (retry and below) has already done all it will for this model
/// when an outcome reaches the fallback layer, so every failure another model can
/// serve falls back: at once for the kinds [`FailureKind::another_model_may_serve`]
/// names (quota, model missing, auth, overloaded, rate limited, breaker open, budget
/// or throttle refusals), and after the retries ran out for the others (server
/// errors, connect failures, timeouts). Two exceptions stop the chain:
///
/// - [`FallbackRoute::Never`] (an invalid request fails anywhere);
/// - a failure that is only retryable for idempotent requests (a timeout or reset
///   after the request was written) when the request is not idempotent: the first
///   provider may have accepted and billed it, and the retry layer refused to resend
///   it for the same reason, so the fallback layer does not resend it elsewhere.
///
/// A response without a [`Classification`] is served as it is: without a verdict
/// the layer never second-guesses the inner stack.
///
/// [`FailureKind::another_model_may_serve`]: backstop_classify::FailureKind::another_model_may_serve
pub fn judge(classification: Option<&Classification>, idempotent: bool) -> Verdict {
    let Some(Classification::Failure(failure)) = classification else {
        return Verdict::Serve;
    };
    let route = failure.fallback_route();
    if route == FallbackRoute::Never {
        return Verdict::Stop;
    }
    if failure.retryable == Retryable::IfIdempotent
        && !idempotent
        && !failure.kind.another_model_may_serve()
    {
        return Verdict::Stop;
    }
    Verdict::FallBack(route)
}

/// Which chain a hop was chosen from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainKind {
    /// The requested model itself, the first hop.
    Requested,
    /// The requested model's chain, or the default chain.
    Ordinary,
    /// The context-length chain.
    ContextLength,
    /// The content-filter chain.
    ContentFilter,
}

/// The walk through the chains of one logical request: remembers every model tried,
/// so none is tried twice, whatever the configuration.
#[derive(Clone, Debug)]
pub(crate) struct ChainWalk {
    requested: Arc<str>,
    tried: Vec<Arc<str>>,
    current: ChainKind,
}

impl ChainWalk {
    pub(crate) fn new(requested: Arc<str>) -> Self {
        // The requested model counts as tried without being stored: most requests
        // never fall back, and this keeps them from allocating the list.
        ChainWalk {
            tried: Vec::new(),
            requested,
            current: ChainKind::Requested,
        }
    }

    /// Whether an ordinary failure ([`FallbackRoute::NextModel`]) of the current hop
    /// would find another model: the hop's request then says so
    /// ([`FallbackAvailable`](backstop_classify::FallbackAvailable)).
    pub(crate) fn has_next(&self, config: &Compiled) -> bool {
        self.untried(config, self.current).next().is_some()
    }

    /// The models of chain `kind` not tried yet, in order.
    fn untried<'a>(
        &'a self,
        config: &'a Compiled,
        kind: ChainKind,
    ) -> impl Iterator<Item = &'a Arc<str>> + 'a {
        let list = match kind {
            ChainKind::Requested | ChainKind::Ordinary => config.chain(&self.requested),
            ChainKind::ContextLength => &config.context_chain,
            ChainKind::ContentFilter => &config.content_chain,
        };
        list.iter()
            .filter(|m| **m != self.requested && !self.tried.contains(m))
    }

    /// The next model for a failure routed `route`, and the chain it came from.
    ///
    /// After a switch to the context-length or content-filter chain, ordinary
    /// failures continue along that chain: its models are the ones that can take the
    /// request at all.
    pub(crate) fn next(
        &mut self,
        config: &Compiled,
        route: FallbackRoute,
    ) -> Option<(Arc<str>, ChainKind)> {
        let kind = match route {
            FallbackRoute::Never => return None,
            FallbackRoute::NextModel => match self.current {
                ChainKind::Requested => ChainKind::Ordinary,
                other => other,
            },
            FallbackRoute::ContextChain => ChainKind::ContextLength,
            FallbackRoute::ContentChain => ChainKind::ContentFilter,
        };
        let next = self.untried(config, kind).next()?.clone();
        self.tried.push(next.clone());
        self.current = kind;
        Some((next, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FallbackConfig, Target};
    use backstop_classify::{Failure, FailureKind};

    fn failed(kind: FailureKind) -> Classification {
        Classification::Failure(Failure::new(kind))
    }

    #[test]
    fn success_and_unclassified_responses_are_served() {
        assert_eq!(judge(Some(&Classification::Success), false), Verdict::Serve);
        assert_eq!(judge(None, false), Verdict::Serve);
    }

    #[test]
    fn invalid_request_never_falls_back() {
        assert_eq!(
            judge(Some(&failed(FailureKind::InvalidRequest)), true),
            Verdict::Stop
        );
    }

    #[test]
    fn each_kind_routes_as_the_vocabulary_says() {
        use FailureKind::*;
        for kind in [
            QuotaExhausted,
            ModelNotFound,
            AuthFailed,
            Overloaded,
            RateLimited,
            BreakerOpen,
            BudgetExhausted,
            Throttled,
            ServerError,
            ConnectFailed,
            RequestTimeout,
            Conflict,
        ] {
            assert_eq!(
                judge(Some(&failed(kind)), false),
                Verdict::FallBack(FallbackRoute::NextModel),
                "{kind}"
            );
        }
        assert_eq!(
            judge(Some(&failed(ContextLengthExceeded)), false),
            Verdict::FallBack(FallbackRoute::ContextChain)
        );
        assert_eq!(
            judge(Some(&failed(ContentFiltered)), false),
            Verdict::FallBack(FallbackRoute::ContentChain)
        );
    }

    #[test]
    fn timeout_after_send_falls_back_only_for_idempotent_requests() {
        for kind in [FailureKind::TimedOut, FailureKind::ConnectionLost] {
            assert_eq!(judge(Some(&failed(kind)), false), Verdict::Stop);
            assert_eq!(
                judge(Some(&failed(kind)), true),
                Verdict::FallBack(FallbackRoute::NextModel)
            );
        }
    }

    fn config() -> FallbackConfig {
        let t = || Target::new("u", "https://u.example/v1");
        FallbackConfig::builder()
            .target("a", t())
            .target("b", t())
            .target("c", t())
            .target("big", t())
            .target("lenient", t())
            .chain("a", ["b", "big", "c"])
            .chain("b", ["a"])
            .default_chain(["c"])
            .context_chain(["big", "lenient"])
            .content_chain(["lenient"])
            .build()
            .unwrap()
    }

    fn walk_all(requested: &str, routes: &[FallbackRoute]) -> Vec<(String, ChainKind)> {
        let config = config();
        let mut walk = ChainWalk::new(Arc::from(requested));
        routes
            .iter()
            .map_while(|r| walk.next(&config.compiled, *r))
            .map(|(m, k)| (m.to_string(), k))
            .collect()
    }

    #[test]
    fn ordinary_chain_is_walked_in_order_and_ends() {
        use FallbackRoute::NextModel as N;
        assert_eq!(
            walk_all("a", &[N, N, N, N]),
            [
                ("b".to_owned(), ChainKind::Ordinary),
                ("big".to_owned(), ChainKind::Ordinary),
                ("c".to_owned(), ChainKind::Ordinary)
            ]
        );
    }

    #[test]
    fn unknown_requested_model_uses_default_chain() {
        assert_eq!(
            walk_all("zzz", &[FallbackRoute::NextModel, FallbackRoute::NextModel]),
            [("c".to_owned(), ChainKind::Ordinary)]
        );
    }

    #[test]
    fn fallback_model_chain_is_not_followed_so_no_loop() {
        // b's chain names a, but a request for a that reached b never goes back.
        use FallbackRoute::NextModel as N;
        let hops = walk_all("a", &[N; 10]);
        assert_eq!(hops.len(), 3);
    }

    #[test]
    fn context_failure_switches_to_context_chain_and_stays_there() {
        use FallbackRoute::*;
        assert_eq!(
            walk_all("a", &[ContextChain, NextModel, NextModel]),
            [
                ("big".to_owned(), ChainKind::ContextLength),
                ("lenient".to_owned(), ChainKind::ContextLength)
            ]
        );
    }

    #[test]
    fn a_model_tried_in_one_chain_is_skipped_in_another() {
        use FallbackRoute::*;
        // a → b → big (ordinary), then a context error: big was tried, lenient is next.
        assert_eq!(
            walk_all("a", &[NextModel, NextModel, ContextChain, ContentChain]),
            [
                ("b".to_owned(), ChainKind::Ordinary),
                ("big".to_owned(), ChainKind::Ordinary),
                ("lenient".to_owned(), ChainKind::ContextLength)
            ]
        );
    }

    #[test]
    fn the_requested_model_is_never_tried_again_from_another_chain() {
        // "big" heads the context chain; a request for it that fails on context
        // length goes on to "lenient", never back to "big".
        assert_eq!(
            walk_all(
                "big",
                &[FallbackRoute::ContextChain, FallbackRoute::ContextChain]
            ),
            [("lenient".to_owned(), ChainKind::ContextLength)]
        );
    }

    #[test]
    fn content_failure_goes_to_content_chain() {
        assert_eq!(
            walk_all("a", &[FallbackRoute::ContentChain]),
            [("lenient".to_owned(), ChainKind::ContentFilter)]
        );
    }
}
