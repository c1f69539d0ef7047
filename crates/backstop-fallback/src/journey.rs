//! One logical request's way through the chain: which hop it is on, what every
//! hop did, and what to return when it ends.

use std::sync::Arc;

use backstop_classify::{
    AttemptLog, BoxError, Classification, ClassifiedError, Deadline, DelayHint, Failure,
    FailureKind, FallbackAvailable, HintSource, LatestStart, ModelRoute, ReplayBody, Retryable,
    classify_transport_error, instant_after,
};
use http::{Request, Response};
use tokio::time::Instant;

use crate::config::{Compiled, CompiledTarget};
use crate::hop::{HopError, Original};
use crate::policy::{ChainKind, ChainWalk, Verdict, judge};
use crate::served::{ChainFailed, ChainStop, Hop, ServedBy};

/// What the future does after an outcome.
pub(crate) enum Step<RB> {
    /// Return this to the caller.
    Return(Result<Response<RB>, ClassifiedError>),
    /// Send this request to the (next) model.
    Next(Request<ReplayBody>),
    /// Every model is cooling down: wait until this instant (before the deadline),
    /// then send this request to the requested model again.
    Wait(Instant, Request<ReplayBody>),
}

pub(crate) struct Journey<RB> {
    config: Arc<Compiled>,
    original: Original,
    walk: ChainWalk,
    idempotent: bool,
    deadline: Option<Instant>,
    /// The hop in flight.
    current: (Arc<str>, ModelRoute, ChainKind),
    hops: Vec<Hop>,
    /// Per finished hop, when its failure's hint says it may serve again.
    reopen: Vec<Option<(Instant, HintSource)>>,
    /// The last response a provider sent that the journey fell back from, with the
    /// index of its hop. When every later hop ends without a response (refused by
    /// a breaker or the throttle, timed out, reset), this is the most informative
    /// failure the caller can get: the provider's own answer, byte-for-byte.
    ///
    /// Boxed: only a request that falls back keeps one, and a response inline
    /// would make every request's future larger (and every move of it dearer).
    kept: Option<Box<(Response<RB>, usize)>>,
    /// Waits for a cooldown so far (each starts a new round of the chain; the
    /// refusals of the rounds before are not kept in `hops`).
    waits: u32,
    span: tracing::Span,
}

impl<RB> Journey<RB> {
    /// Starts the journey and builds the first hop's request; `target` is the
    /// requested model's, when it has one (the caller has looked it up already).
    pub(crate) fn start(
        config: Arc<Compiled>,
        original: Original,
        target: Option<&CompiledTarget>,
        idempotent: bool,
        deadline: Option<Instant>,
        span: tracing::Span,
    ) -> Result<(Self, Request<ReplayBody>), ClassifiedError> {
        let requested = original.model.clone();
        let dl = deadline.map(Deadline);
        let (request, route) = match target {
            Some(target) => original
                .for_target(&config, target, dl)
                .map_err(|e| ClassifiedError::new(Failure::new(FailureKind::InvalidRequest), e))?,
            None => original.pass_through(dl),
        };
        let walk = ChainWalk::new(requested.clone());
        let mut request = request;
        // The first hop of a configured model: its chain is known from the config.
        let has_next = target.map_or_else(|| walk.has_next(&config), |t| t.has_chain);
        if has_next {
            request.extensions_mut().insert(FallbackAvailable);
        }
        mark_latest_start(&mut request, deadline, &config);
        let journey = Journey {
            walk,
            current: (requested, route, ChainKind::Requested),
            config,
            original,
            idempotent,
            deadline,
            hops: Vec::new(),
            reopen: Vec::new(),
            kept: None,
            waits: 0,
            span,
        };
        Ok((journey, request))
    }

    /// The deadline, for the future's timer.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether a hop started `at` leaves the time the configuration asks for
    /// ([`FallbackConfigBuilder::min_hop_time`](crate::FallbackConfigBuilder::min_hop_time)):
    /// some time before the deadline, and at least that minimum. Always, without a
    /// deadline.
    pub(crate) fn may_start_hop(&self, at: Instant) -> bool {
        self.deadline.is_none_or(|deadline| {
            deadline
                .checked_duration_since(at)
                .is_some_and(|left| !left.is_zero() && left >= self.config.min_hop_time)
        })
    }

    /// A hop's response arrived.
    pub(crate) fn on_response(&mut self, mut response: Response<RB>) -> Step<RB> {
        let extensions = response.extensions();
        let verdict = judge(extensions.get::<Classification>(), self.idempotent);
        let attempts = extensions.get::<AttemptLog>().cloned();
        let failure = extensions
            .get::<Classification>()
            .and_then(Classification::failure)
            .cloned();
        let stop = match verdict {
            Verdict::Serve => {
                // The journey ends served: there is no "try again at" to work out, so
                // no reopening instant to keep (and no list to allocate for it).
                self.record_hop(attempts, None);
                self.span.record(
                    "gen_ai.response.model",
                    &*backstop_classify::printed_name(&self.current.1.model),
                );
                let served = self.served_by(true, None);
                response.extensions_mut().insert(served);
                return Step::Return(Ok(response));
            }
            Verdict::Stop => {
                self.record(attempts, failure);
                self.stop_reason(ChainStop::NotFallbackable)
            }
            Verdict::FallBack(route) => {
                let kind = failure.as_ref().map(|f| f.kind);
                self.record(attempts, failure);
                match self.advance(route, kind) {
                    Ok(next) => {
                        // A newer provider answer replaces an older one.
                        self.kept = Some(Box::new((response, self.hops.len() - 1)));
                        return Step::Next(next);
                    }
                    Err(stop) => stop,
                }
            }
        };
        // The last provider's response goes back byte-for-byte: only the record is added.
        let served = self.served_by(false, Some(stop));
        response.extensions_mut().insert(served);
        Step::Return(Ok(response))
    }

    /// A hop's error arrived (or the inner service failed to become ready).
    pub(crate) fn on_error(&mut self, error: BoxError) -> Step<RB> {
        let mut error = into_classified(error);
        let attempts = error.take_attempt_log();
        let failure = error.failure().clone();
        let kind = failure.kind;
        let verdict = judge(
            Some(&Classification::Failure(failure.clone())),
            self.idempotent,
        );
        self.record(attempts.clone(), Some(failure));
        let stop = match verdict {
            Verdict::Serve | Verdict::Stop => self.stop_reason(ChainStop::NotFallbackable),
            Verdict::FallBack(route) => match self.advance(route, Some(kind)) {
                Ok(next) => return Step::Next(next),
                Err(stop) => stop,
            },
        };
        if stop == ChainStop::ChainExhausted
            && let Some((until, request)) = self.wait_for_cooldown()
        {
            return Step::Wait(until, request);
        }
        self.finish_without_response(error, attempts, stop)
    }

    /// When every model of this round was refused by a cooldown the upstream set (a
    /// pace learned from its slow-down signals, or a breaker held open by its delay
    /// hint: refusals marked [`Retryable::Yes`]) and the earliest of them ends before
    /// the deadline: starts a new round at the requested model, to be sent at that
    /// moment. Nothing reached a provider in this round, so the wait adds no attempt
    /// the retry layer or the budget refused; without a deadline there is no bound
    /// on the wait (a quota cooldown lasts minutes), so the layer never waits.
    ///
    /// A breaker that opened on its own evidence (failures counted, a probe failed,
    /// no hint) is not waited for: the upstream is down for as long as it takes, and
    /// the caller is better served by a fast failure that says when to try again
    /// than by a request held until its deadline.
    fn wait_for_cooldown(&mut self) -> Option<(Instant, Request<ReplayBody>)> {
        let deadline = self.deadline?;
        if self.waits >= self.config.cooldown_waits || self.kept.is_some() {
            return None;
        }
        let round = &self.hops[..];
        let cooling = |h: &Hop| {
            h.failure.as_ref().is_some_and(|f| {
                f.kind == FailureKind::BreakerOpen
                    && f.hint.is_some()
                    && f.retryable == Retryable::Yes
            })
        };
        if round.is_empty() || !round.iter().all(cooling) {
            return None;
        }
        let until = self.reopen.iter().flatten().map(|(at, _)| *at).min()?;
        if !self.may_start_hop(until) {
            return None;
        }
        let requested = self.original.model.clone();
        let dl = Some(Deadline(deadline));
        let (request, route) = match self.config.targets.get(&requested) {
            Some(target) => self.original.for_target(&self.config, target, dl).ok()?,
            None => self.original.pass_through(dl),
        };
        self.waits += 1;
        // The round was refusals only, summed up by the wait count: the record keeps
        // naming each model at most once.
        self.hops.clear();
        self.reopen.clear();
        self.walk = ChainWalk::new(requested.clone());
        tracing::info!(
            parent: &self.span,
            model = %requested,
            wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
            waits = self.waits,
            "every model is cooling down; waiting for the earliest reopening",
        );
        self.current = (requested, route, ChainKind::Requested);
        let mut request = request;
        mark_fallback(&mut request, &self.walk, &self.config);
        mark_latest_start(&mut request, self.deadline, &self.config);
        Some((until, request))
    }

    /// The total deadline fired while a hop was in flight.
    pub(crate) fn on_deadline(&mut self) -> Step<RB> {
        let failure = Failure::new(FailureKind::TimedOut);
        self.record(None, Some(failure.clone()));
        let error = ClassifiedError::local(failure);
        self.finish_without_response(error, None, ChainStop::DeadlineReached)
    }

    /// The chain ended on a hop that got no response: the caller gets the last
    /// provider response the journey fell back from, if there was one (with the full
    /// record, naming the model that sent it), else the error.
    fn finish_without_response(
        &mut self,
        error: ClassifiedError,
        attempts: Option<AttemptLog>,
        stop: ChainStop,
    ) -> Step<RB> {
        match self.kept.take().map(|kept| *kept) {
            Some((mut response, hop)) => {
                let mut served = self.served_by(false, Some(stop));
                if let Some(h) = served.hops.get(hop) {
                    served.model = h.model.clone();
                    served.route = h.route.clone();
                }
                response.extensions_mut().insert(served);
                Step::Return(Ok(response))
            }
            None => Step::Return(Err(self.final_error(error, attempts, stop))),
        }
    }

    fn final_error(
        &mut self,
        error: ClassifiedError,
        attempts: Option<AttemptLog>,
        stop: ChainStop,
    ) -> ClassifiedError {
        let served = self.served_by(false, Some(stop));
        let (mut failure, source) = error.into_parts();
        if let Some(at) = served.retry_at {
            let source = self
                .reopen
                .iter()
                .flatten()
                .find(|(when, _)| *when == at)
                .map(|(_, s)| *s)
                .unwrap_or(HintSource::Breaker);
            failure.hint = Some(DelayHint::new(
                at.saturating_duration_since(Instant::now()),
                source,
            ));
        }
        let error = ClassifiedError::new(failure, ChainFailed::new(served, source));
        match attempts {
            Some(log) => error.with_attempt_log(log),
            None => error,
        }
    }

    /// An inner layer that honours the [`Deadline`] gives up at the same instant the
    /// chain's timer fires, with a verdict of its own: the deadline is the real reason.
    fn stop_reason(&self, otherwise: ChainStop) -> ChainStop {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            ChainStop::DeadlineReached
        } else {
            otherwise
        }
    }

    /// Moves to the next model for a failure routed `route`, or says why not.
    fn advance(
        &mut self,
        route: backstop_classify::FallbackRoute,
        reason: Option<FailureKind>,
    ) -> Result<Request<ReplayBody>, ChainStop> {
        let Some((model, chain)) = self.walk.next(&self.config, route) else {
            return Err(ChainStop::ChainExhausted);
        };
        if !self.may_start_hop(Instant::now()) {
            return Err(ChainStop::DeadlineReached);
        }
        let Some(target) = self.config.targets.get(&model) else {
            // Validation guarantees every chained model has a target.
            return Err(ChainStop::HopNotBuilt(format!(
                "model \"{model}\" has no target"
            )));
        };
        let (request, route) = self
            .original
            .for_target(&self.config, target, self.deadline.map(Deadline))
            .map_err(|HopError(why)| ChainStop::HopNotBuilt(why))?;
        tracing::info!(
            parent: &self.span,
            from = %backstop_classify::printed_name(&self.current.0),
            to = %model,
            upstream = %route.upstream,
            reason = reason.map(FailureKind::as_str).unwrap_or("unknown"),
            "fallback fired",
        );
        self.current = (model, route, chain);
        let mut request = request;
        mark_fallback(&mut request, &self.walk, &self.config);
        mark_latest_start(&mut request, self.deadline, &self.config);
        Ok(request)
    }

    fn record(&mut self, attempts: Option<AttemptLog>, failure: Option<Failure>) {
        let reopen = failure
            .as_ref()
            .and_then(|f| f.hint)
            .map(|h| (instant_after(Instant::now(), h.delay), h.source));
        self.reopen.push(reopen);
        self.record_hop(attempts, failure);
    }

    fn record_hop(&mut self, attempts: Option<AttemptLog>, failure: Option<Failure>) {
        // Room for exactly one more hop: most requests are served by their first
        // model, and a chain is a few models long (a `Vec`'s first push would make
        // room for four, 1.3 KB of 328-byte hops, on every request).
        self.hops.reserve_exact(1);
        self.hops.push(Hop {
            model: self.current.0.clone(),
            route: self.current.1.clone(),
            chain: self.current.2,
            attempts,
            failure,
        });
    }

    fn served_by(&mut self, served: bool, stop: Option<ChainStop>) -> ServedBy {
        // Only when every model tried is waiting out a hint does "try again at" mean
        // something: then it is the earliest of them.
        let retry_at = if served || self.reopen.iter().any(Option::is_none) {
            None
        } else {
            self.reopen.iter().flatten().map(|(at, _)| *at).min()
        };
        let fallback_fired = self.hops.iter().any(|h| h.model != self.original.model);
        ServedBy {
            requested_model: self.original.model.clone(),
            model: self.current.0.clone(),
            route: self.current.1.clone(),
            served,
            fallback_fired,
            cooldown_waits: self.waits,
            // The journey ends when the record is made: move the hops out.
            hops: std::mem::take(&mut self.hops),
            stop,
            retry_at,
        }
    }
}

/// The inner stack's error as a verdict: Backstop layers already return a
/// [`ClassifiedError`]; anything else is a transport error to classify.
pub(crate) fn into_classified(error: BoxError) -> ClassifiedError {
    match error.downcast::<ClassifiedError>() {
        Ok(classified) => *classified,
        Err(other) => {
            let failure = classify_transport_error(&*other);
            ClassifiedError::new(failure, other)
        }
    }
}

/// Tells the layers inside that another model can take this request if this hop
/// fails in the ordinary way: the retry layer then hands a hinted failure over at
/// once instead of waiting it out here.
fn mark_fallback(request: &mut Request<ReplayBody>, walk: &ChainWalk, config: &Compiled) {
    if walk.has_next(config) {
        request.extensions_mut().insert(FallbackAvailable);
    }
}

/// Puts the latest instant worth starting the hop at on its request, when a minimum
/// hop time is configured and there is a deadline: a breaker that books a paced slot
/// for the hop then books none the journey would decline to use.
fn mark_latest_start(
    request: &mut Request<ReplayBody>,
    deadline: Option<Instant>,
    config: &Compiled,
) {
    if config.min_hop_time.is_zero() {
        return;
    }
    if let Some(deadline) = deadline {
        request
            .extensions_mut()
            .insert(LatestStart::before(deadline, config.min_hop_time));
    }
}
