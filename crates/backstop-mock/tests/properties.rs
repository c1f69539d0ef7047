//! Properties over arbitrary inputs: the mock never panics, is deterministic, and
//! sends custom faults byte for byte.

use backstop_mock::{Fault, MockProvider, ModelPlan, Scenario};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::ServiceExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Status and full body of each answer, in order.
async fn play(mock: &MockProvider, models: &[&str]) -> Vec<(u16, Bytes)> {
    let mut out = Vec::new();
    for model in models {
        let body = serde_json::json!({"model": model, "messages": []}).to_string();
        let req = Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = mock.clone().oneshot(req).await.unwrap();
        let status = response.status().as_u16();
        out.push((
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        ));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_requests_always_get_an_answer(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        method in prop::sample::select(vec![Method::GET, Method::POST, Method::PUT]),
        path in prop::sample::select(vec!["/v1/chat/completions", "/v1/models", "/chat/completions", "/x", "/"]),
    ) {
        let mock = MockProvider::new(Scenario::new(1));
        let status = runtime().block_on(async {
            let req = Request::builder().method(method).uri(path).body(Full::new(Bytes::from(body))).unwrap();
            mock.clone().oneshot(req).await.unwrap().status().as_u16()
        });
        prop_assert!([200, 400, 404].contains(&status), "status {}", status);
        prop_assert_eq!(mock.attempt_count(), 1);
    }

    #[test]
    fn same_seed_and_order_give_identical_bytes(
        seed in any::<u64>(),
        p in 0.0f64..=1.0,
        order in proptest::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..30),
    ) {
        let scenario = Scenario::new(seed)
            .model("a", ModelPlan::script([Fault::OpenAiServerError]).with_random(p, Fault::AnthropicOverloaded))
            .model("b", ModelPlan::ok().with_random(p, Fault::GeminiResourceExhausted { retry_delay: Some("3s".into()), per_day: false }));
        let first = runtime().block_on(play(&MockProvider::new(scenario.clone()), &order));
        let second = runtime().block_on(play(&MockProvider::new(scenario), &order));
        prop_assert_eq!(first, second);
    }

    #[test]
    fn custom_status_faults_are_sent_exactly_or_rejected_up_front(
        status in 0u16..1100,
        name in "[a-zA-Z0-9 -]{0,12}",
        value in "[ -~\t]{0,16}",
        body in ".{0,64}",
    ) {
        let fault = Fault::Status { status, headers: vec![(name.clone(), value.clone())], body: body.clone() };
        let scenario = Scenario::new(1).model("m", ModelPlan::always(fault));
        if scenario.validate().is_err() {
            let valid_status = (100..1000).contains(&status);
            let valid_header = http::HeaderName::try_from(name.as_str()).is_ok()
                && http::HeaderValue::try_from(value.as_str()).is_ok();
            prop_assert!(!(valid_status && valid_header));
            return Ok(());
        }
        let mock = MockProvider::new(scenario);
        let (got_status, got_value, got_body) = runtime().block_on(async {
            let req = Request::post("/v1/chat/completions")
                .body(Full::new(Bytes::from_static(br#"{"model":"m"}"#)))
                .unwrap();
            let response = mock.clone().oneshot(req).await.unwrap();
            let got_value = response.headers().get(name.as_str()).map(|v| v.as_bytes().to_vec());
            let status = response.status().as_u16();
            (status, got_value, response.into_body().collect().await.unwrap().to_bytes())
        });
        prop_assert_eq!(got_status, status);
        prop_assert_eq!(got_value, Some(value.into_bytes()));
        prop_assert_eq!(&got_body[..], body.as_bytes());
    }
}
