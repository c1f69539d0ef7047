//! Scenarios written in TOML and JSON.

use std::time::Duration;

use backstop_mock::{
    Capacity, Fault, Latency, MockProvider, ModelPlan, Scenario, ScenarioError, StreamStyle,
};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tower::ServiceExt;

const FULL_TOML: &str = r#"
seed = 42

[default]
then = { kind = "openai_model_not_found" }

[models."gpt-4o"]
script = [
    { kind = "openai_rate_limit", retry_after = "2" },
    { kind = "openai_rate_limit", retry_after = "2" },
]
latency = { kind = "fixed", value = "250ms" }
stream_chunks = 5
chunk_delay = "20ms"

[[models."gpt-4o".random]]
probability = 0.1
fault = { kind = "openai_server_error" }

[[models."gpt-4o".outages]]
from = "10s"
until = "1m"
fault = { kind = "with_headers", fault = { kind = "openai_overloaded" }, headers = [["x-should-retry", "true"]] }

[models."gpt-4o".capacity]
max_in_flight = 4
max_per_second = 10
over = { kind = "openai_overloaded" }

[models."claude"]
then = { kind = "stream_error_after", chunks = 2, style = "anthropic" }
latency = { kind = "log_normal", median = "300ms", sigma = 0.5, cap = "5s" }

[models."gemini"]
script = [{ kind = "gemini_resource_exhausted", retry_delay = "58s", per_day = true }]
latency = { kind = "uniform", min = "1ms", max = "1s" }

[models."custom"]
then = { kind = "status", status = 418, headers = [["retry-after", "-1"]], body = "teapot" }
latency = { kind = "exponential", mean = "200ms", cap = "2s" }
"#;

fn expected() -> Scenario {
    let limited = Fault::OpenAiRateLimit {
        retry_after: Some("2".into()),
        retry_after_ms: None,
    };
    Scenario::new(42)
        .default_plan(ModelPlan::always(Fault::OpenAiModelNotFound))
        .model(
            "gpt-4o",
            ModelPlan::script([limited.clone(), limited])
                .latency(Latency::fixed(Duration::from_millis(250)))
                .stream_chunks(5)
                .chunk_delay(Duration::from_millis(20))
                .with_random(0.1, Fault::OpenAiServerError)
                .outage(
                    Duration::from_secs(10),
                    Duration::from_secs(60),
                    Fault::OpenAiOverloaded.with_header("x-should-retry", "true"),
                )
                .capacity(Capacity {
                    max_in_flight: Some(4),
                    max_per_second: Some(10),
                    over: Fault::OpenAiOverloaded,
                }),
        )
        .model(
            "claude",
            ModelPlan::always(Fault::StreamErrorAfter {
                chunks: 2,
                style: StreamStyle::Anthropic,
            })
            .latency(Latency::log_normal(
                Duration::from_millis(300),
                0.5,
                Duration::from_secs(5),
            )),
        )
        .model(
            "gemini",
            ModelPlan::script([Fault::GeminiResourceExhausted {
                retry_delay: Some("58s".into()),
                per_day: true,
            }])
            .latency(Latency::uniform(
                Duration::from_millis(1),
                Duration::from_secs(1),
            )),
        )
        .model(
            "custom",
            ModelPlan::always(Fault::Status {
                status: 418,
                headers: vec![("retry-after".into(), "-1".into())],
                body: "teapot".into(),
            })
            .latency(Latency::exponential(
                Duration::from_millis(200),
                Duration::from_secs(2),
            )),
        )
}

#[test]
fn toml_scenario_reads_into_the_same_value_as_the_builder() {
    assert_eq!(Scenario::from_toml_str(FULL_TOML).unwrap(), expected());
}

#[test]
fn json_round_trip_keeps_the_scenario_identical() {
    let json = expected().to_json_string();
    assert_eq!(Scenario::from_json_str(&json).unwrap(), expected());
    assert!(
        json.contains("\"250ms\""),
        "durations are written in human form: {json}"
    );
}

#[test]
fn an_empty_toml_scenario_is_seed_zero_and_always_ok() {
    assert_eq!(Scenario::from_toml_str("").unwrap(), Scenario::new(0));
}

#[test]
fn unknown_fields_are_rejected_rather_than_ignored() {
    let err = Scenario::from_toml_str("[models.m]\nscirpt = []\n").unwrap_err();
    assert!(matches!(err, ScenarioError::Toml(_)), "{err}");
    assert!(err.to_string().contains("scirpt"), "{err}");
}

#[test]
fn unreadable_durations_say_how_to_write_them() {
    let err = Scenario::from_toml_str("[models.m]\nchunk_delay = \"fast\"\n").unwrap_err();
    assert!(err.to_string().contains("\"250ms\""), "{err}");
}

#[test]
fn probabilities_outside_zero_to_one_are_rejected() {
    let toml = "[[models.m.random]]\nprobability = 1.5\nfault = { kind = \"ok\" }\n";
    let err = Scenario::from_toml_str(toml).unwrap_err();
    assert_eq!(
        err,
        ScenarioError::Invalid {
            model: "m".into(),
            problem: "probability 1.5 is outside 0..=1".into()
        }
    );
}

#[test]
fn inverted_outage_windows_are_rejected() {
    let toml = "[[models.m.outages]]\nfrom = \"5s\"\nuntil = \"1s\"\nfault = { kind = \"hang\" }\n";
    let err = Scenario::from_toml_str(toml).unwrap_err();
    assert!(err.to_string().contains("outage ends"), "{err}");
}

#[test]
fn invalid_statuses_and_header_names_are_rejected_up_front() {
    let bad_status = r#"{"models": {"m": {"then": {"kind": "status", "status": 1000}}}}"#;
    let err = Scenario::from_json_str(bad_status).unwrap_err();
    assert!(
        err.to_string().contains("invalid HTTP status 1000"),
        "{err}"
    );
    let bad_header = r#"{"default": {"then": {"kind": "with_headers", "fault": {"kind": "ok"}, "headers": [["bad header", "x"]]}}}"#;
    let err = Scenario::from_json_str(bad_header).unwrap_err();
    assert!(err.to_string().contains("(default)"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_toml_scenario_plays_its_script() {
    let mock = MockProvider::new(Scenario::from_toml_str(FULL_TOML).unwrap());
    let mut statuses = Vec::new();
    for model in ["gpt-4o", "gpt-4o", "gpt-4o", "unknown", "custom"] {
        let body = serde_json::json!({"model": model, "messages": []}).to_string();
        let req = Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        statuses.push(mock.clone().oneshot(req).await.unwrap().status().as_u16());
    }
    // 0.1 random server errors could hit the third attempt; seed 42 is pinned here.
    assert_eq!(statuses, [429, 429, 200, 404, 418]);
}

#[test]
fn streams_larger_than_an_answer_may_be_are_refused_by_name() {
    let refused = |plan: &str| {
        let text = format!("[models.\"m\"]\n{plan}\n");
        Scenario::from_toml_str(&text).expect_err(plan).to_string()
    };
    // `vec![PING_FRAME; pings]` would not fit in memory.
    assert_eq!(
        refused("stream_pings = 9000000000000000000"),
        "scenario plan for model \"m\" is invalid: stream_pings 9000000000000000000 is over the most one answer sends, 1000000"
    );
    assert_eq!(
        refused("stream_chunks = 1000001"),
        "scenario plan for model \"m\" is invalid: stream_chunks 1000001 is over the most one answer sends, 1000000"
    );
    // `k + 1` overflowed for the largest count.
    assert_eq!(
        refused("then = { kind = \"reset_after_chunks\", chunks = 18446744073709551615 }"),
        "scenario plan for model \"m\" is invalid: 18446744073709551615 chunks is over the most one answer sends, 1000000"
    );
    let most = format!(
        "stream_chunks = {0}\nstream_pings = {0}",
        backstop_mock::MAX_STREAM_FRAMES
    );
    Scenario::from_toml_str(&format!("[models.\"m\"]\n{most}\n")).expect("the most is accepted");
}
