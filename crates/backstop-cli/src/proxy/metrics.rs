//! `/metrics`: request counters by outcome, upstream attempts and fallbacks, the
//! breaker state of every key and the retry budget, in the Prometheus text format.
//!
//! Hand-written (a few counters need no exporter crate): [`Counters`] are atomics
//! bumped once per request; [`render`] is a pure function of their values and the
//! stack's snapshots.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use backstop::breaker::KeySnapshot;
use backstop::budget::{BudgetSnapshot, ThrottleSnapshot};

/// How a request through the proxy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The requested model served.
    Served,
    /// Another model in the chain served.
    ServedByFallback,
    /// Backstop gave up and passed the provider's error response on.
    UpstreamError,
    /// Backstop gave up with an error of its own (breaker open, transport failure,
    /// timeout, budget).
    LocalError,
    /// The proxy refused the request before the stack (unknown route or model, body
    /// too large, not JSON).
    Rejected,
    /// The proxy was at its in-flight bound: answered 503 at once, body unread.
    Shed,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Served,
        Outcome::ServedByFallback,
        Outcome::UpstreamError,
        Outcome::LocalError,
        Outcome::Rejected,
        Outcome::Shed,
    ];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::ServedByFallback => "served_by_fallback",
            Outcome::UpstreamError => "upstream_error",
            Outcome::LocalError => "local_error",
            Outcome::Rejected => "rejected",
            Outcome::Shed => "shed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The proxy's counters, shared by every connection.
#[derive(Debug, Default)]
pub struct Counters {
    requests: [AtomicU64; 6],
    attempts: AtomicU64,
    fallbacks: AtomicU64,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    write_timeouts: AtomicU64,
    unread_streams_cut: AtomicU64,
}

/// The counters' values at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValues {
    /// Requests per [`Outcome`], in [`Outcome`] declaration order.
    pub requests: [u64; 6],
    /// Upstream attempts.
    pub attempts: u64,
    /// Requests on which a fallback fired.
    pub fallbacks: u64,
    /// Chat requests in flight now (a gauge, filled in by the proxy).
    pub in_flight: u64,
    /// The in-flight bound beyond which requests are shed.
    pub max_in_flight: u64,
    /// Request-body bytes held now (a gauge, filled in by the proxy).
    pub buffered_body_bytes: u64,
    /// The body budget beyond which requests are shed.
    pub max_buffered_body_bytes: u64,
    /// Client connections open now.
    pub connections_open: u64,
    /// Connections refused (503 or closed at once) at the connection limit.
    pub connections_refused: u64,
    /// Connections closed because a write to the client waited out the write
    /// timeout.
    pub write_timeouts: u64,
    /// HTTP/2 streams whose upstream request was dropped because the client left
    /// them unread for the write timeout while its connection lived on.
    pub unread_streams_cut: u64,
}

impl Counters {
    /// Counts one finished request.
    pub fn record(&self, outcome: Outcome, attempts: usize, fallback: bool) {
        self.requests[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.attempts.fetch_add(attempts as u64, Ordering::Relaxed);
        if fallback {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A client connection was accepted and is being served.
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    /// A served client connection ended.
    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// A connection over the connection limit was refused.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed: its client took no bytes for the write timeout.
    pub fn write_timed_out(&self) {
        self.write_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// An HTTP/2 stream's upstream request was dropped: its client left it unread
    /// for the write timeout.
    pub fn unread_stream_cut(&self) {
        self.unread_streams_cut.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn values(&self) -> CounterValues {
        CounterValues {
            requests: std::array::from_fn(|i| self.requests[i].load(Ordering::Relaxed)),
            attempts: self.attempts.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            in_flight: 0,
            max_in_flight: 0,
            buffered_body_bytes: 0,
            max_buffered_body_bytes: 0,
            connections_open: self.connections_open.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            write_timeouts: self.write_timeouts.load(Ordering::Relaxed),
            unread_streams_cut: self.unread_streams_cut.load(Ordering::Relaxed),
        }
    }
}

/// The Prometheus text exposition (format 0.0.4) of the counters, every breaker key,
/// the budget and, when it is on, the adaptive throttle.
pub fn render(
    counters: &CounterValues,
    breakers: &[KeySnapshot],
    budget: &BudgetSnapshot,
    throttle: Option<&ThrottleSnapshot>,
) -> String {
    let mut out = String::with_capacity(2048);
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        out,
        "# HELP backstop_proxy_requests_total Requests through the proxy, by how they ended.\n\
         # TYPE backstop_proxy_requests_total counter"
    );
    for outcome in Outcome::ALL {
        let _ = writeln!(
            out,
            "backstop_proxy_requests_total{{outcome=\"{}\"}} {}",
            outcome.as_str(),
            counters.requests[outcome.index()]
        );
    }
    let _ = writeln!(
        out,
        "# HELP backstop_proxy_upstream_attempts_total Attempts sent to upstream providers, retries and fallbacks included.\n\
         # TYPE backstop_proxy_upstream_attempts_total counter\n\
         backstop_proxy_upstream_attempts_total {}\n\
         # HELP backstop_proxy_fallbacks_total Requests on which another model than the requested one was tried.\n\
         # TYPE backstop_proxy_fallbacks_total counter\n\
         backstop_proxy_fallbacks_total {}\n\
         # HELP backstop_proxy_in_flight Chat requests in flight (streams until their last byte).\n\
         # TYPE backstop_proxy_in_flight gauge\n\
         backstop_proxy_in_flight {}\n\
         # HELP backstop_proxy_max_in_flight The in-flight bound beyond which requests are shed with a 503.\n\
         # TYPE backstop_proxy_max_in_flight gauge\n\
         backstop_proxy_max_in_flight {}\n\
         # HELP backstop_proxy_buffered_body_bytes Request-body bytes the chat requests in flight hold.\n\
         # TYPE backstop_proxy_buffered_body_bytes gauge\n\
         backstop_proxy_buffered_body_bytes {}\n\
         # HELP backstop_proxy_max_buffered_body_bytes The body budget beyond which requests are shed with a 503.\n\
         # TYPE backstop_proxy_max_buffered_body_bytes gauge\n\
         backstop_proxy_max_buffered_body_bytes {}\n\
         # HELP backstop_proxy_connections_open Client connections open.\n\
         # TYPE backstop_proxy_connections_open gauge\n\
         backstop_proxy_connections_open {}\n\
         # HELP backstop_proxy_connections_refused_total Connections refused at the connection limit.\n\
         # TYPE backstop_proxy_connections_refused_total counter\n\
         backstop_proxy_connections_refused_total {}\n\
         # HELP backstop_proxy_write_timeouts_total Connections closed because the client took no bytes for the write timeout.\n\
         # TYPE backstop_proxy_write_timeouts_total counter\n\
         backstop_proxy_write_timeouts_total {}\n\
         # HELP backstop_proxy_unread_streams_cut_total HTTP/2 streams whose upstream request was dropped because the client left them unread for the write timeout.\n\
         # TYPE backstop_proxy_unread_streams_cut_total counter\n\
         backstop_proxy_unread_streams_cut_total {}",
        counters.attempts,
        counters.fallbacks,
        counters.in_flight,
        counters.max_in_flight,
        counters.buffered_body_bytes,
        counters.max_buffered_body_bytes,
        counters.connections_open,
        counters.connections_refused,
        counters.write_timeouts,
        counters.unread_streams_cut
    );
    let _ = writeln!(
        out,
        "# HELP backstop_breaker_state 1 for the state each breaker key is in.\n\
         # TYPE backstop_breaker_state gauge"
    );
    for key in breakers {
        let labels = format!(
            "upstream=\"{}\",model=\"{}\",credential=\"{}\"",
            escape(&key.route.upstream),
            escape(&key.route.model),
            escape(key.route.credential.as_deref().unwrap_or(""))
        );
        for state in ["closed", "open", "half_open"] {
            let on = u8::from(key.state.as_str() == state);
            let _ = writeln!(
                out,
                "backstop_breaker_state{{{labels},state=\"{state}\"}} {on}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP backstop_breaker_retry_in_seconds Time until an open breaker key half-opens.\n\
         # TYPE backstop_breaker_retry_in_seconds gauge"
    );
    for key in breakers {
        if let Some(retry_in) = key.retry_in {
            let _ = writeln!(
                out,
                "backstop_breaker_retry_in_seconds{{upstream=\"{}\",model=\"{}\",credential=\"{}\"}} {}",
                escape(&key.route.upstream),
                escape(&key.route.model),
                escape(key.route.credential.as_deref().unwrap_or("")),
                retry_in.as_secs_f64()
            );
        }
    }
    let model = escape(budget.model);
    let _ = writeln!(
        out,
        "# HELP backstop_budget_balance Retry budget balance, in retries.\n\
         # TYPE backstop_budget_balance gauge\n\
         backstop_budget_balance{{model=\"{model}\"}} {}\n\
         # HELP backstop_budget_retries_available Retries the budget would allow right now.\n\
         # TYPE backstop_budget_retries_available gauge\n\
         backstop_budget_retries_available{{model=\"{model}\"}} {}\n\
         # HELP backstop_budget_deposits_total Logical requests deposited in the budget.\n\
         # TYPE backstop_budget_deposits_total counter\n\
         backstop_budget_deposits_total{{model=\"{model}\"}} {}\n\
         # HELP backstop_budget_retries_total Retries asked of the budget, by decision.\n\
         # TYPE backstop_budget_retries_total counter\n\
         backstop_budget_retries_total{{model=\"{model}\",decision=\"allowed\"}} {}\n\
         backstop_budget_retries_total{{model=\"{model}\",decision=\"refused\"}} {}\n\
         # HELP backstop_budget_retries_refunded_total Allowed retries given back because they were not made (counted as allowed too).\n\
         # TYPE backstop_budget_retries_refunded_total counter\n\
         backstop_budget_retries_refunded_total{{model=\"{model}\"}} {}",
        budget.balance,
        budget.retries_available,
        budget.deposits,
        budget.retries_allowed,
        budget.retries_refused,
        budget.retries_refunded
    );
    if let Some(throttle) = throttle {
        let _ = writeln!(
            out,
            "# HELP backstop_throttle_rejection_probability Probability the next request is rejected locally (adaptive throttling).\n\
             # TYPE backstop_throttle_rejection_probability gauge\n\
             backstop_throttle_rejection_probability {}\n\
             # HELP backstop_throttle_local_rejections_total Requests rejected locally by adaptive throttling.\n\
             # TYPE backstop_throttle_local_rejections_total counter\n\
             backstop_throttle_local_rejections_total {}",
            throttle.rejection_probability, throttle.local_rejections
        );
    }
    out
}

/// A label value as the text format requires: backslash, double quote and newline
/// escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_per_outcome() {
        let counters = Counters::default();
        counters.record(Outcome::Served, 1, false);
        counters.record(Outcome::ServedByFallback, 3, true);
        counters.record(Outcome::Rejected, 0, false);
        counters.record(Outcome::Shed, 0, false);
        counters.record(Outcome::Served, 2, false);
        counters.connection_opened();
        counters.connection_opened();
        counters.connection_closed();
        counters.connection_refused();
        counters.connection_refused();
        counters.write_timed_out();
        counters.unread_stream_cut();
        counters.unread_stream_cut();
        assert_eq!(
            counters.values(),
            CounterValues {
                requests: [2, 1, 0, 0, 1, 1],
                attempts: 6,
                fallbacks: 1,
                in_flight: 0,
                max_in_flight: 0,
                buffered_body_bytes: 0,
                max_buffered_body_bytes: 0,
                connections_open: 1,
                connections_refused: 2,
                write_timeouts: 1,
                unread_streams_cut: 2,
            }
        );
    }

    #[test]
    fn rendering_lists_each_outcome_and_the_budget() {
        let values = CounterValues {
            requests: [5, 1, 2, 0, 3, 4],
            attempts: 11,
            fallbacks: 1,
            in_flight: 7,
            max_in_flight: 1024,
            buffered_body_bytes: 4096,
            max_buffered_body_bytes: 268_435_456,
            connections_open: 12,
            connections_refused: 3,
            write_timeouts: 2,
            unread_streams_cut: 5,
        };
        let mut budget = BudgetSnapshot::new("windowed");
        budget.deposits = 9;
        budget.retries_refused = 2;
        budget.retries_refunded = 1;
        let text = render(&values, &[], &budget, None);
        for line in [
            "backstop_proxy_requests_total{outcome=\"served\"} 5",
            "backstop_proxy_requests_total{outcome=\"served_by_fallback\"} 1",
            "backstop_proxy_requests_total{outcome=\"upstream_error\"} 2",
            "backstop_proxy_requests_total{outcome=\"local_error\"} 0",
            "backstop_proxy_requests_total{outcome=\"rejected\"} 3",
            "backstop_proxy_requests_total{outcome=\"shed\"} 4",
            "backstop_proxy_in_flight 7",
            "backstop_proxy_max_in_flight 1024",
            "backstop_proxy_buffered_body_bytes 4096",
            "backstop_proxy_max_buffered_body_bytes 268435456",
            "backstop_proxy_connections_open 12",
            "backstop_proxy_connections_refused_total 3",
            "backstop_proxy_write_timeouts_total 2",
            "backstop_proxy_unread_streams_cut_total 5",
            "backstop_proxy_upstream_attempts_total 11",
            "backstop_proxy_fallbacks_total 1",
            "backstop_budget_deposits_total{model=\"windowed\"} 9",
            "backstop_budget_retries_total{model=\"windowed\",decision=\"refused\"} 2",
            "backstop_budget_retries_refunded_total{model=\"windowed\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
