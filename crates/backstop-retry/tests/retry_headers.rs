//! A retry sends exactly the headers the first attempt sent: the same names in the
//! same order, repeated names with their values in order, the same bytes, and the
//! same sensitivity, for a short list and for the fourteen headers an SDK sends (the
//! layer packs both into one buffer). A value `http` would refuse is kept as a
//! clone of the map instead (the packing's rule is `http`'s, tested for every byte
//! in `src/kept.rs`); such a value cannot be built in a test: `http` asserts
//! against it in debug builds.

mod common;

use backstop_retry::{RetryConfig, RetryLayer};
use common::{Fake, Step, request};
use http::{HeaderMap, HeaderName, HeaderValue};
use tower::{Layer, ServiceExt};

/// Each header as `HeaderMap::iter` gives it: name, value bytes, sensitivity.
fn listing(map: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
    map.iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
        .collect()
}

/// Sends a request with `headers` through a first attempt that fails with a 500
/// and a retry that succeeds; the headers each attempt saw.
async fn both_attempts(headers: HeaderMap) -> (HeaderMap, HeaderMap) {
    let fake = Fake::new(vec![Step::status(500), Step::ok("{}")]);
    let svc = RetryLayer::new(RetryConfig::interactive()).layer(fake.clone());
    let mut request = request("{}");
    *request.headers_mut() = headers;
    let response = svc.oneshot(request).await.expect("the retry succeeds");
    assert_eq!(response.status(), 200);
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    (seen[0].headers.clone(), seen[1].headers.clone())
}

fn secret(value: &'static str) -> HeaderValue {
    let mut value = HeaderValue::from_static(value);
    value.set_sensitive(true);
    value
}

#[tokio::test(start_paused = true)]
async fn a_short_list_built_in_code_comes_back_exactly() {
    let mut headers = HeaderMap::new();
    headers.append("x-team", HeaderValue::from_str("search").unwrap());
    headers.insert(http::header::AUTHORIZATION, secret("Bearer sk-test"));
    headers.append("x-team", HeaderValue::from_str("billing").unwrap());
    let (first, retry) = both_attempts(headers.clone()).await;
    assert_eq!(listing(&first), listing(&headers));
    assert_eq!(listing(&retry), listing(&headers));
    assert!(retry[http::header::AUTHORIZATION].is_sensitive());
}

#[tokio::test(start_paused = true)]
async fn a_long_list_as_an_sdk_sends_it_comes_back_exactly() {
    let mut headers = HeaderMap::new();
    for i in 0..14 {
        let name = HeaderName::from_bytes(format!("x-stainless-{i}").as_bytes()).unwrap();
        headers.append(name, HeaderValue::from_str(&format!("value {i}")).unwrap());
    }
    headers.insert(http::header::AUTHORIZATION, secret("Bearer sk-proj-test"));
    let (first, retry) = both_attempts(headers.clone()).await;
    assert_eq!(listing(&first), listing(&headers));
    assert_eq!(listing(&retry), listing(&headers));
}
