//! A custom classification rule, without forking the crate: a self-hosted gateway
//! answers 400 with `"code": "upstream_busy"` when its backends are saturated; that is
//! an overload (retry later, or fall back), not a bad request.
//!
//! `cargo run --example custom_rule`

use backstop::classify::{Classification, FailureKind, Retryable, Rule, Rules};
use http::{HeaderMap, StatusCode};

fn main() {
    let body = br#"{"error":{"message":"all backends busy","type":"invalid_request_error","code":"upstream_busy"}}"#;
    let now = std::time::SystemTime::now();

    let builtin = Rules::generic();
    let verdict = builtin.classify_response(StatusCode::BAD_REQUEST, &HeaderMap::new(), body, now);
    println!("built-in rules: {}", describe(&verdict));

    let custom = Rules::generic().with_rule(
        Rule::new()
            .when_status(StatusCode::BAD_REQUEST)
            .when_code("upstream_busy")
            .then_kind(FailureKind::Overloaded)
            .then_retryable(Retryable::Yes),
    );
    let verdict = custom.classify_response(StatusCode::BAD_REQUEST, &HeaderMap::new(), body, now);
    println!("with the rule:  {}", describe(&verdict));
    // Use it in the stack with BackstopLayer::builder().rules(custom), or in a
    // ServiceBuilder with ServiceBuilderExt::classify(custom).
}

fn describe(c: &Classification) -> String {
    match c.failure() {
        None => "success".into(),
        Some(f) => format!(
            "{} (retryable: {:?}, fallback: {:?})",
            f.kind,
            f.retryable,
            f.fallback_route()
        ),
    }
}
