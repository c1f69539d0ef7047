//! Typed values the layers exchange through request extensions.
//!
//! These live in the classify crate because every other layer already depends on it:
//! it is the shared vocabulary of the stack.

use std::sync::Arc;

/// The total deadline of a logical request, across every attempt, wait and fallback hop.
///
/// The outermost layer that knows the deadline (fallback, or retry when used alone)
/// inserts it; inner layers never start an attempt or a sleep that would cross it.
/// It is a [`tokio::time::Instant`], so tests run it in virtual time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(pub tokio::time::Instant);

/// The latest instant at which a new call for this request is still worth starting:
/// its [`Deadline`] less the time a call needs, as the layer that sets it was
/// configured (the fallback layer's `min_hop_time`).
///
/// A layer that books a future slot for the call (the breaker, when the upstream is
/// paced) books none after it: a slot the request would not use is lost to every
/// other request. Without it, the [`Deadline`] is the limit. The retry layer does not
/// read it: its retries keep to its own minimum (`min_attempt_time`), which may be
/// shorter, since a retry on a model that is answering is a better bet than a new
/// hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LatestStart(pub tokio::time::Instant);

impl LatestStart {
    /// `min_left` before `deadline`. A minimum longer than the clock can count back
    /// (only an absurd setting) leaves no time at all: the latest start is now.
    pub fn before(deadline: tokio::time::Instant, min_left: std::time::Duration) -> Self {
        LatestStart(
            deadline
                .checked_sub(min_left)
                .unwrap_or_else(tokio::time::Instant::now),
        )
    }
}

/// Marks a request as idempotent: a timeout or reset after it was written may be
/// retried. (A request carrying an `Idempotency-Key` header is idempotent too.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Idempotent;

/// Put on a hop's request by the fallback layer when the chain has another model
/// after this one for an ordinary failure: a failure the provider asked to have
/// waited out (a delay hint) can go to that model at once instead. The retry layer
/// reads it (see `backstop-retry`'s fallback handoff).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FallbackAvailable;

/// Which model at which upstream an attempt is for; the breaker keys its state on it.
///
/// The fallback layer sets it on every hop. `credential` is a non-secret label (such
/// as `"openai-key-2"`) for setups where several keys serve one model; it never holds
/// the key itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRoute {
    /// The upstream's name (as configured), or the request URI's authority.
    pub upstream: Arc<str>,
    /// The model name as the upstream spells it.
    pub model: Arc<str>,
    /// A label for the credential, when several serve one model.
    pub credential: Option<Arc<str>>,
}

impl ModelRoute {
    /// A route to `model` at `upstream`.
    pub fn new(upstream: impl Into<Arc<str>>, model: impl Into<Arc<str>>) -> Self {
        ModelRoute {
            upstream: upstream.into(),
            model: model.into(),
            credential: None,
        }
    }

    /// A route to `model` at the host (and port) of a request URI's authority,
    /// for a request no configured upstream names. User information
    /// (`user:password@`) is left out: the upstream goes into breaker keys, logs
    /// and metrics labels.
    pub fn at_authority(authority: &http::uri::Authority, model: impl Into<Arc<str>>) -> Self {
        let host_and_port = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, host)| host);
        ModelRoute::new(host_and_port, model)
    }
}

/// The longest name (a model, an upstream) that logs, span fields and error
/// messages print whole. A model name comes from the caller's request body, which
/// may be megabytes long; a real one is under a hundred bytes.
pub const MAX_PRINTED_NAME: usize = 256;

/// `name` as logs, span fields and error messages print it: whole when it is at
/// most [`MAX_PRINTED_NAME`] bytes, otherwise its first bytes up to that length
/// (cut at a character boundary) and `…`.
pub fn printed_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= MAX_PRINTED_NAME {
        return std::borrow::Cow::Borrowed(name);
    }
    std::borrow::Cow::Owned(format!("{}…", prefix_within(name, MAX_PRINTED_NAME)))
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character
/// boundary: how a string from outside is cut to a cap.
pub(crate) fn prefix_within(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl std::fmt::Display for ModelRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.upstream, self.model)?;
        if let Some(c) = &self.credential {
            write!(f, "#{c}")?;
        }
        Ok(())
    }
}

/// Whether a request is idempotent: it carries an `Idempotency-Key` header or the
/// [`Idempotent`] marker.
pub fn is_idempotent<B>(request: &http::Request<B>) -> bool {
    // A prebuilt name: looking up a `&str` parses and lower-cases it on every call,
    // which cost more than the rest of this check on the success path.
    const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
    request.extensions().get::<Idempotent>().is_some()
        || request.headers().contains_key(IDEMPOTENCY_KEY)
}

/// A retry budget shared by many requests, as the retry layer sees it.
///
/// The budget layer (outside the retry layer) deposits for every logical request and
/// puts a [`RetryBudgetHandle`] in the request's extensions; the retry layer asks
/// [`RetryBudget::try_withdraw`] before every retry and does not retry when refused.
/// Without a handle the retry layer retries on its own caps alone.
///
/// The budget caps the retries that are *sent*: a withdrawal whose retry is then not
/// made (the upstream's pace had no slot for it after the wait, the inner service did
/// not become ready before the deadline, or the caller dropped the request during the
/// wait) is given back with [`RetryBudget::refund`].
pub trait RetryBudget: Send + Sync + 'static {
    /// Takes the right to make one retry; `false` means the retry must not be made.
    fn try_withdraw(&self) -> bool;

    /// Gives back the withdrawal this handle allowed last, whose retry was not made.
    /// The retry layer calls it at most once per allowed withdrawal, and never for a
    /// retry it sent. The default keeps the withdrawal: a budget that cannot give one
    /// back errs towards fewer retries, never more.
    fn refund(&self) {}
}

/// The request extension through which the retry layer reaches the budget.
#[derive(Clone)]
pub struct RetryBudgetHandle(pub Arc<dyn RetryBudget>);

impl std::fmt::Debug for RetryBudgetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetryBudgetHandle")
    }
}

/// The pace the upstream set for the key a request goes to, as the retry layer sees it.
///
/// After a provider's slow-down signals (429s, 503s) the breaker paces that key: it
/// admits calls at the rate the provider proved it takes. On every request it admits
/// while the key is paced it puts a [`PaceHandle`]; the retry layer (inside it) asks
/// [`UpstreamPace::admit_retry`] before each retry, so retries take paced slots like
/// new calls instead of going out on top of the pace (where they would cause the very
/// 429s they retry). Without a handle the retry layer retries on its own rules alone.
pub trait UpstreamPace: Send + Sync + 'static {
    /// Takes a slot for one retry at `now`. `Err(wait)`: none is free; the slot booked
    /// for this retry is due in `wait` (ask again then). A retry that could not come
    /// back before `deadline` books nothing.
    fn admit_retry(
        &self,
        now: tokio::time::Instant,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), std::time::Duration>;

    /// How long from `now` until the next slot a retry could take (zero: one is free
    /// now), without booking it: the retry layer gives up at once, before its wait,
    /// when that is past the deadline. The default: zero.
    fn retry_due_in(&self, now: tokio::time::Instant) -> std::time::Duration {
        let _ = now;
        std::time::Duration::ZERO
    }

    /// An attempt of this call was answered with a 429 at `now`. The pace can slow
    /// down at once rather than when the whole call (with its retries) finishes,
    /// seconds later. (The retry layer reports 429s only: a 503 speaks of capacity,
    /// and is left to the call's outcome.) The default ignores it.
    fn slowed_down(&self, now: tokio::time::Instant) {
        let _ = now;
    }
}

/// The request extension through which the retry layer reaches the upstream's pace.
#[derive(Clone)]
pub struct PaceHandle(pub Arc<dyn UpstreamPace>);

impl std::fmt::Debug for PaceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaceHandle")
    }
}

/// Why the retry layer stopped attempting a logical request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The attempt succeeded.
    Succeeded,
    /// The classification said a retry cannot help (or the request was not
    /// idempotent for a post-send failure).
    NotRetryable,
    /// The maximum number of attempts was reached.
    MaxAttempts,
    /// The next wait would have crossed the deadline.
    Deadline,
    /// The provider's delay hint was longer than the configured maximum, or than the
    /// time left: retrying now would be early, waiting is the caller's (or the
    /// fallback layer's) decision.
    HintTooLong,
    /// The retry budget refused the retry.
    BudgetExhausted,
    /// The upstream's pace ([`PaceHandle`]) had no slot for the retry before the
    /// deadline: the last failure (with its delay hint) is handed on.
    PaceRefused,
    /// The first SSE event of a stream was an error and no retry was allowed.
    StreamFailed,
    /// The provider asked for a wait (a delay hint) and another model can serve the
    /// request ([`FallbackAvailable`]): the failure went to the fallback layer at once
    /// instead of being waited out on this model.
    HandedToFallback,
}

/// One attempt of a logical request, as the retry layer recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AttemptRecord {
    /// 1 for the first attempt.
    pub number: u32,
    /// Its verdict.
    pub classification: crate::Classification,
    /// The HTTP status, when the provider answered.
    pub status: Option<http::StatusCode>,
    /// The provider's request id (`x-request-id` or `request-id`), when sent.
    pub provider_request_id: Option<http::HeaderValue>,
    /// How long the retry layer waited before starting this attempt.
    pub waited: std::time::Duration,
    /// The delay hint that set that wait, if one did.
    pub hint_used: Option<crate::DelayHint>,
}

impl AttemptRecord {
    /// A record of attempt `number` with `classification`.
    pub fn new(number: u32, classification: crate::Classification) -> Self {
        AttemptRecord {
            number,
            classification,
            status: None,
            provider_request_id: None,
            waited: std::time::Duration::ZERO,
            hint_used: None,
        }
    }
}

/// Every attempt of one logical request against one model, and why attempting
/// stopped. The retry layer puts it in the extensions of the response it returns (and
/// of the [`ClassifiedError`](crate::ClassifiedError)'s context via
/// [`AttemptLog`] on error paths where it can); the fallback layer collects one per model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttemptLog {
    /// The attempts, in order.
    pub attempts: AttemptRecords,
    /// Why attempting stopped, once it has.
    pub stop: Option<StopReason>,
}

/// The attempts of an [`AttemptLog`], in order: a slice to read (it derefs to
/// `[AttemptRecord]`), grown with [`push`](AttemptRecords::push).
///
/// Most logical requests make one attempt, and every response carries its log, so the
/// first record is stored inline: a first-attempt success costs no allocation for it
/// (a `Vec` would cost one on every request). A second record moves them all to the
/// heap.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AttemptRecords(Records);

#[derive(Clone, Default, PartialEq, Eq)]
enum Records {
    #[default]
    None,
    One(AttemptRecord),
    Many(Vec<AttemptRecord>),
}

impl AttemptRecords {
    /// No attempts yet.
    pub const fn new() -> Self {
        AttemptRecords(Records::None)
    }

    /// Appends the next attempt's record.
    #[inline]
    pub fn push(&mut self, record: AttemptRecord) {
        if let Records::None = self.0 {
            // The common case, without moving the (large) record twice.
            self.0 = Records::One(record);
            return;
        }
        self.0 = match std::mem::take(&mut self.0) {
            Records::None => Records::One(record),
            Records::One(first) => Records::Many(vec![first, record]),
            Records::Many(mut all) => {
                all.push(record);
                Records::Many(all)
            }
        };
    }

    /// The records as a slice.
    pub fn as_slice(&self) -> &[AttemptRecord] {
        match &self.0 {
            Records::None => &[],
            Records::One(one) => std::slice::from_ref(one),
            Records::Many(all) => all,
        }
    }

    /// The records, mutably (to amend one, not to add one).
    pub fn as_mut_slice(&mut self) -> &mut [AttemptRecord] {
        match &mut self.0 {
            Records::None => &mut [],
            Records::One(one) => std::slice::from_mut(one),
            Records::Many(all) => all,
        }
    }

    /// The records as a `Vec` (allocates).
    pub fn into_vec(self) -> Vec<AttemptRecord> {
        match self.0 {
            Records::None => Vec::new(),
            Records::One(one) => vec![one],
            Records::Many(all) => all,
        }
    }
}

impl std::ops::Deref for AttemptRecords {
    type Target = [AttemptRecord];

    fn deref(&self) -> &[AttemptRecord] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AttemptRecords {
    fn deref_mut(&mut self) -> &mut [AttemptRecord] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AttemptRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl From<Vec<AttemptRecord>> for AttemptRecords {
    fn from(records: Vec<AttemptRecord>) -> Self {
        let mut records = records;
        AttemptRecords(match records.len() {
            0 => Records::None,
            1 => Records::One(records.remove(0)),
            _ => Records::Many(records),
        })
    }
}

impl FromIterator<AttemptRecord> for AttemptRecords {
    fn from_iter<I: IntoIterator<Item = AttemptRecord>>(iter: I) -> Self {
        let mut records = AttemptRecords::new();
        for record in iter {
            records.push(record);
        }
        records
    }
}

impl<'a> IntoIterator for &'a AttemptRecords {
    type Item = &'a AttemptRecord;
    type IntoIter = std::slice::Iter<'a, AttemptRecord>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl IntoIterator for AttemptRecords {
    type Item = AttemptRecord;
    type IntoIter = std::vec::IntoIter<AttemptRecord>;

    fn into_iter(self) -> Self::IntoIter {
        self.into_vec().into_iter()
    }
}

impl PartialEq<[AttemptRecord]> for AttemptRecords {
    fn eq(&self, other: &[AttemptRecord]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<Vec<AttemptRecord>> for AttemptRecords {
    fn eq(&self, other: &Vec<AttemptRecord>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_from_an_authority_leaves_out_user_information() {
        let with_user: http::uri::Authority = "user:s3cret@api.example.com:8443".parse().unwrap();
        let route = ModelRoute::at_authority(&with_user, "m");
        assert_eq!(&*route.upstream, "api.example.com:8443");
        let plain: http::uri::Authority = "api.example.com".parse().unwrap();
        assert_eq!(
            &*ModelRoute::at_authority(&plain, "m").upstream,
            "api.example.com"
        );
    }

    #[test]
    fn a_long_name_prints_cut_at_a_character_boundary() {
        assert_eq!(printed_name("gpt-4o"), "gpt-4o");
        let exact = "m".repeat(MAX_PRINTED_NAME);
        assert_eq!(printed_name(&exact), exact);
        let long = "m".repeat(8 << 20);
        assert_eq!(
            printed_name(&long),
            format!("{}…", "m".repeat(MAX_PRINTED_NAME))
        );
        // A three-byte character straddling the cut is left out whole.
        let straddling = format!("{}€tail", "m".repeat(MAX_PRINTED_NAME - 1));
        assert_eq!(
            printed_name(&straddling),
            format!("{}…", "m".repeat(MAX_PRINTED_NAME - 1))
        );
    }

    fn record(number: u32) -> AttemptRecord {
        AttemptRecord::new(number, crate::Classification::Success)
    }

    #[test]
    fn attempt_records_keep_their_order_inline_and_on_the_heap() {
        let mut records = AttemptRecords::new();
        assert!(records.is_empty());
        records.push(record(1));
        assert_eq!(records.iter().map(|r| r.number).collect::<Vec<_>>(), [1]);
        records.push(record(2));
        records.push(record(3));
        assert_eq!(
            records.iter().map(|r| r.number).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(records.last().map(|r| r.number), Some(3));
        let same: AttemptRecords = vec![record(1), record(2), record(3)].into();
        assert_eq!(records, same);
        assert_eq!(
            records.clone().into_vec(),
            vec![record(1), record(2), record(3)]
        );
        records[0].waited = std::time::Duration::from_secs(1);
        assert_eq!(records[0].waited, std::time::Duration::from_secs(1));
        assert_eq!(
            format!("{:?}", AttemptRecords::from(vec![record(7)])),
            format!("{:?}", [record(7)])
        );
    }

    #[test]
    fn idempotent_by_header_in_any_case_or_by_marker_and_not_otherwise() {
        let plain = http::Request::post("/v1/chat/completions")
            .body(())
            .unwrap();
        assert!(!is_idempotent(&plain));

        let keyed = http::Request::post("/v1/chat/completions")
            .header("Idempotency-Key", "k-1")
            .body(())
            .unwrap();
        assert!(is_idempotent(&keyed));

        let mut marked = http::Request::post("/v1/chat/completions")
            .body(())
            .unwrap();
        marked.extensions_mut().insert(Idempotent);
        assert!(is_idempotent(&marked));

        // A header that only starts like the key is not the key.
        let other = http::Request::post("/v1/chat/completions")
            .header("idempotency-keys", "k-1")
            .body(())
            .unwrap();
        assert!(!is_idempotent(&other));
    }
}
