//! The in-memory face, driven through `tower::ServiceExt` in paused tokio time.

use std::io;
use std::time::Duration;

use backstop_mock::{
    AnswerSource, Capacity, Fault, Latency, MAX_MODEL_NAME_BYTES, MAX_MODELS, MockBody,
    MockProvider, ModelPlan, Scenario,
};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::ServiceExt;

fn chat(model: &str, stream: bool) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    });
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn send(mock: &MockProvider, req: Request<Full<Bytes>>) -> io::Result<Response<MockBody>> {
    mock.clone().oneshot(req).await
}

async fn body_bytes(response: Response<MockBody>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(start_paused = true)]
async fn non_streaming_success_names_the_served_model_and_carries_a_request_id() {
    let mock = MockProvider::new(Scenario::new(1));
    let response = send(&mock, chat("gpt-4o-mini", false)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req_mock_0");
    assert_eq!(response.headers()["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "gpt-4o-mini");
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "mock(gpt-4o-mini) w1 w2"
    );
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(start_paused = true)]
async fn script_then_fault_gives_exact_answers_and_counts() {
    let mock = MockProvider::new(
        Scenario::new(1).model(
            "a",
            ModelPlan::script([Fault::OpenAiServerError, Fault::AnthropicOverloaded])
                .then(Fault::OpenAiInsufficientQuota),
        ),
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            send(&mock, chat("a", false))
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [500, 529, 429, 429]);
    assert_eq!(mock.attempt_count(), 4);
    assert_eq!(mock.attempts_for("a"), 4);
    assert_eq!(mock.attempts_for("b"), 0);
    let seqs: Vec<u64> = mock.attempts().iter().map(|a| a.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn unlisted_models_use_the_default_plan_and_listed_ones_their_own() {
    let mock = MockProvider::new(
        Scenario::new(1)
            .model("good", ModelPlan::ok())
            .default_plan(ModelPlan::always(Fault::OpenAiModelNotFound)),
    );
    assert_eq!(
        send(&mock, chat("good", false)).await.unwrap().status(),
        200
    );
    let missing = send(&mock, chat("nope", false)).await.unwrap();
    assert_eq!(missing.status(), 404);
    let json: serde_json::Value = serde_json::from_slice(&body_bytes(missing).await).unwrap();
    assert_eq!(
        json["error"]["message"],
        "The model `nope` does not exist or you do not have access to it."
    );
}

#[tokio::test(start_paused = true)]
async fn fixed_latency_delays_the_head_by_exactly_that_long() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::ok().latency(Latency::fixed(Duration::from_millis(250))),
    ));
    let start = Instant::now();
    send(&mock, chat("m", false)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    // Recorded at arrival, before the latency.
    assert_eq!(mock.attempts()[0].since_start, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn stream_frames_arrive_one_by_one_at_the_configured_delay() {
    let mock = MockProvider::new(
        Scenario::new(1).model(
            "m",
            ModelPlan::ok()
                .stream_chunks(3)
                .chunk_delay(Duration::from_millis(100))
                .latency(Latency::fixed(Duration::from_millis(50))),
        ),
    );
    let start = Instant::now();
    let response = send(&mock, chat("m", true)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(mock.attempts()[0].stream);
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        arrivals.push(start.elapsed());
        frames.push(String::from_utf8(data.to_vec()).unwrap());
    }
    let ms = Duration::from_millis;
    assert_eq!(arrivals, [ms(50), ms(150), ms(250), ms(350)]);
    assert_eq!(frames.len(), 4);
    assert!(
        frames[..3]
            .iter()
            .all(|f| f.starts_with("data: {") && f.ends_with("}\n\n"))
    );
    assert_eq!(frames[3], "data: [DONE]\n\n");
    let first: serde_json::Value =
        serde_json::from_str(frames[0].trim_start_matches("data: ").trim_end()).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["model"], "m");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
}

#[tokio::test(start_paused = true)]
async fn stream_error_after_k_chunks_ends_with_an_openai_error_event_and_no_done() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::always(Fault::StreamErrorAfter {
            chunks: 2,
            style: backstop_mock::StreamStyle::OpenAi,
        }),
    ));
    let body = body_bytes(send(&mock, chat("m", true)).await.unwrap()).await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[2],
        r#"data: {"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#
    );
    assert!(!text.contains("[DONE]"));
}

#[tokio::test(start_paused = true)]
async fn anthropic_style_stream_error_is_an_error_event() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::always(Fault::StreamErrorAfter {
            chunks: 1,
            style: backstop_mock::StreamStyle::Anthropic,
        }),
    ));
    let body = body_bytes(send(&mock, chat("m", true)).await.unwrap()).await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.ends_with(
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
    ), "{text}");
}

#[tokio::test(start_paused = true)]
async fn hang_never_answers_and_is_recorded() {
    let mock = MockProvider::new(Scenario::new(1).model("m", ModelPlan::always(Fault::Hang)));
    let outcome =
        tokio::time::timeout(Duration::from_secs(3600), send(&mock, chat("m", false))).await;
    assert!(outcome.is_err(), "a hang must outlast any timeout");
    assert_eq!(mock.attempt_count(), 1);
    assert_eq!(mock.in_flight("m"), 0, "giving up on a hang frees its slot");
    assert_eq!(mock.attempts()[0].fault, Fault::Hang);
    assert!(mock.attempts()[0].delivered);
}

#[tokio::test(start_paused = true)]
async fn connect_refused_is_an_io_error_recorded_as_not_delivered() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::always(Fault::ConnectRefused).latency(Latency::fixed(Duration::from_secs(5))),
    ));
    let start = Instant::now();
    let error = send(&mock, chat("m", false)).await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(start.elapsed(), Duration::ZERO, "a refusal is immediate");
    assert!(!mock.attempts()[0].delivered);
}

#[tokio::test(start_paused = true)]
async fn reset_before_head_fails_after_the_latency() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::always(Fault::ResetBeforeHead).latency(Latency::fixed(Duration::from_secs(2))),
    ));
    let start = Instant::now();
    let error = send(&mock, chat("m", false)).await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert!(mock.attempts()[0].delivered);
}

#[tokio::test(start_paused = true)]
async fn reset_after_head_gives_a_200_whose_body_fails() {
    let mock =
        MockProvider::new(Scenario::new(1).model("m", ModelPlan::always(Fault::ResetAfterHead)));
    let response = send(&mock, chat("m", true)).await.unwrap();
    assert_eq!(response.status(), 200);
    let error = response.into_body().collect().await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test(start_paused = true)]
async fn reset_after_chunks_sends_exactly_k_chunks_then_fails() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::always(Fault::ResetAfterChunks { chunks: 2 }),
    ));
    let mut body = send(&mock, chat("m", true)).await.unwrap().into_body();
    let mut got = 0;
    loop {
        match body.frame().await {
            Some(Ok(_)) => got += 1,
            Some(Err(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
                break;
            }
            None => panic!("stream ended without the reset"),
        }
    }
    assert_eq!(got, 2);
}

#[tokio::test(start_paused = true)]
async fn outage_window_answers_its_fault_only_inside_the_window() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::ok().outage(
            Duration::from_secs(10),
            Duration::from_secs(20),
            Fault::OpenAiOverloaded,
        ),
    ));
    let mut statuses = Vec::new();
    for at in [0, 10, 15, 20] {
        tokio::time::sleep_until(mock.started_at() + Duration::from_secs(at)).await;
        statuses.push(
            send(&mock, chat("m", false))
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 503, 503, 200]);
    let sources: Vec<AnswerSource> = mock.attempts().iter().map(|a| a.source).collect();
    assert_eq!(
        sources,
        [
            AnswerSource::Plan,
            AnswerSource::Outage,
            AnswerSource::Outage,
            AnswerSource::Plan
        ]
    );
    let since: Vec<u64> = mock
        .attempts()
        .iter()
        .map(|a| a.since_start.as_secs())
        .collect();
    assert_eq!(since, [0, 10, 15, 20]);
}

#[tokio::test(start_paused = true)]
async fn in_flight_capacity_rejects_while_a_stream_is_open_and_admits_once_it_ends() {
    let mock = MockProvider::new(
        Scenario::new(1).model(
            "m",
            ModelPlan::ok()
                .chunk_delay(Duration::from_secs(1))
                .capacity(Capacity::in_flight(1).over(Fault::OpenAiOverloaded)),
        ),
    );
    let open = send(&mock, chat("m", true)).await.unwrap();
    assert_eq!(mock.in_flight("m"), 1);
    assert_eq!(send(&mock, chat("m", false)).await.unwrap().status(), 503);
    body_bytes(open).await;
    assert_eq!(mock.in_flight("m"), 0);
    assert_eq!(send(&mock, chat("m", false)).await.unwrap().status(), 200);
    let sources: Vec<AnswerSource> = mock.attempts().iter().map(|a| a.source).collect();
    assert_eq!(
        sources,
        [
            AnswerSource::Plan,
            AnswerSource::OverCapacity,
            AnswerSource::Plan
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn per_second_capacity_answers_429_with_retry_after() {
    let mock = MockProvider::new(
        Scenario::new(1).model("m", ModelPlan::ok().capacity(Capacity::per_second(2))),
    );
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(send(&mock, chat("m", false)).await.unwrap());
    }
    // Two within the quota, the third over it.
    let codes: Vec<u16> = statuses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(codes, [200, 200, 429]);
    assert_eq!(statuses[2].headers()["retry-after"], "1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(send(&mock, chat("m", false)).await.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn same_seed_gives_the_same_answers_and_another_seed_does_not() {
    let plan = ModelPlan::ok()
        .with_random(0.3, Fault::OpenAiServerError)
        .with_random(0.2, Fault::AnthropicOverloaded);
    let run = |seed: u64| {
        let plan = plan.clone();
        async move {
            let mock = MockProvider::new(
                Scenario::new(seed)
                    .model("m", plan.clone())
                    .model("n", plan),
            );
            let mut answers = Vec::new();
            for i in 0..60 {
                let model = if i % 3 == 0 { "n" } else { "m" };
                answers.push(
                    send(&mock, chat(model, false))
                        .await
                        .unwrap()
                        .status()
                        .as_u16(),
                );
            }
            answers
        }
    };
    let a = run(42).await;
    assert_eq!(a, run(42).await);
    assert_ne!(a, run(43).await);
    assert!(a.contains(&500) && a.contains(&529) && a.contains(&200));
}

#[tokio::test(start_paused = true)]
async fn models_endpoint_lists_the_scenario_models() {
    let mock = MockProvider::new(
        Scenario::new(1)
            .model("b", ModelPlan::ok())
            .model("a", ModelPlan::ok()),
    );
    let req = Request::get("/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = send(&mock, req).await.unwrap();
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    let ids: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(mock.attempts()[0].source, AnswerSource::Protocol);
}

#[tokio::test(start_paused = true)]
async fn bodies_over_16_mib_get_413_without_a_decision() {
    let mock = MockProvider::new(Scenario::new(1).default_plan(ModelPlan::always(Fault::Hang)));
    let big = vec![b' '; 16 * 1024 * 1024 + 1];
    let req = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from(big)))
        .unwrap();
    let response = send(&mock, req).await.unwrap();
    assert_eq!(response.status(), 413);
    let attempt = &mock.attempts()[0];
    assert_eq!(attempt.model, None);
    assert_eq!(attempt.source, AnswerSource::Protocol);
}

#[tokio::test(start_paused = true)]
async fn a_model_name_over_256_bytes_gets_400_and_holds_no_state() {
    let mock = MockProvider::new(Scenario::new(1));
    let longest = "m".repeat(MAX_MODEL_NAME_BYTES);
    assert_eq!(
        send(&mock, chat(&longest, false)).await.unwrap().status(),
        200
    );
    let response = send(&mock, chat(&format!("{longest}m"), false))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["error"]["code"], "model_name_too_long");
    let attempts = mock.attempts();
    assert_eq!(attempts[1].model, None);
    assert_eq!(attempts[1].source, AnswerSource::Protocol);
    assert_eq!(mock.attempts_for(&longest), 1);
}

#[tokio::test(start_paused = true)]
async fn past_the_model_cap_a_new_model_gets_404_and_a_known_one_is_served() {
    let mock = MockProvider::new(Scenario::new(1));
    for i in 0..MAX_MODELS {
        let response = send(&mock, chat(&format!("model-{i}"), false))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "model-{i}");
    }
    let response = send(&mock, chat("one-too-many", false)).await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(mock.attempts_for("one-too-many"), 0);
    assert_eq!(mock.attempts().last().unwrap().model, None);
    // A model seen before the cap is still served.
    assert_eq!(
        send(&mock, chat("model-7", false)).await.unwrap().status(),
        200
    );
    assert_eq!(mock.attempts_for("model-7"), 2);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_model_get_400_and_unknown_paths_404() {
    let mock = MockProvider::new(Scenario::new(1));
    let no_model = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&mock, no_model).await.unwrap().status(), 400);
    let not_json = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{")))
        .unwrap();
    assert_eq!(send(&mock, not_json).await.unwrap().status(), 400);
    let unknown = Request::post("/v1/embeddings")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&mock, unknown).await.unwrap().status(), 404);
    assert_eq!(mock.attempt_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn records_keep_request_headers_with_credentials_hidden_from_debug() {
    let mock = MockProvider::new(Scenario::new(1));
    let mut req = chat("m", false);
    req.headers_mut()
        .insert("authorization", "Bearer sk-live-abc".parse().unwrap());
    req.headers_mut()
        .insert("idempotency-key", "key-1".parse().unwrap());
    send(&mock, req).await.unwrap();
    let attempt = &mock.attempts()[0];
    assert_eq!(attempt.header("idempotency-key"), Some("key-1"));
    assert_eq!(attempt.header("authorization"), Some("Bearer sk-live-abc"));
    assert!(!format!("{attempt:?}").contains("sk-live-abc"));
}

#[tokio::test(start_paused = true)]
async fn reset_records_forgets_attempts_but_the_script_keeps_its_place() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::script([Fault::OpenAiServerError]).then(Fault::GatewayTimeout),
    ));
    send(&mock, chat("m", false)).await.unwrap();
    mock.reset_records();
    assert_eq!(mock.attempt_count(), 0);
    assert_eq!(send(&mock, chat("m", false)).await.unwrap().status(), 504);
    assert_eq!(mock.attempts()[0].seq, 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_attempts_are_answered_in_first_poll_order_whatever_their_latency() {
    let mock = MockProvider::new(Scenario::new(1).model(
        "m",
        ModelPlan::script([Fault::OpenAiServerError, Fault::GatewayTimeout]).latency(
            Latency::uniform(Duration::from_millis(1), Duration::from_secs(1)),
        ),
    ));
    // `join!` polls its futures in order, so the first one arrives first.
    let (a, b, c) = tokio::join!(
        send(&mock, chat("m", false)),
        send(&mock, chat("m", false)),
        send(&mock, chat("m", false)),
    );
    let statuses = [a, b, c].map(|r| r.unwrap().status().as_u16());
    assert_eq!(statuses, [500, 504, 200]);
}

#[tokio::test(start_paused = true)]
async fn seeded_latencies_repeat_exactly_across_runs() {
    let plan = ModelPlan::ok().latency(Latency::log_normal(
        Duration::from_millis(300),
        0.8,
        Duration::from_secs(10),
    ));
    let mut runs = Vec::new();
    for seed in [8, 8, 9] {
        let mock = MockProvider::new(Scenario::new(seed).model("m", plan.clone()));
        let mut waits = Vec::new();
        for _ in 0..10 {
            let start = Instant::now();
            send(&mock, chat("m", false)).await.unwrap();
            waits.push(start.elapsed());
        }
        runs.push(waits);
    }
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[0], runs[2]);
    assert!(
        runs[0]
            .iter()
            .all(|w| *w > Duration::ZERO && *w <= Duration::from_secs(10))
    );
}

#[tokio::test(start_paused = true)]
async fn traffic_to_one_model_does_not_change_another_models_answers() {
    let plan = ModelPlan::ok().with_random(0.5, Fault::OpenAiServerError);
    let scenario = Scenario::new(77).model("a", plan.clone()).model("b", plan);
    let alone = MockProvider::new(scenario.clone());
    let mixed = MockProvider::new(scenario);
    let mut a_alone = Vec::new();
    let mut a_mixed = Vec::new();
    for _ in 0..30 {
        a_alone.push(send(&alone, chat("a", false)).await.unwrap().status());
        send(&mixed, chat("b", false)).await.unwrap();
        a_mixed.push(send(&mixed, chat("a", false)).await.unwrap().status());
    }
    assert_eq!(a_alone, a_mixed);
}

#[test]
fn provider_body_and_future_can_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send<T: Send + 'static>() {}
    fn unpin<T: Unpin>() {}
    send_sync::<MockProvider>();
    send_sync::<MockBody>();
    unpin::<MockBody>();
    send::<backstop_mock::ResponseFuture>();
    send_sync::<backstop_mock::Attempt>();
    send_sync::<Scenario>();
}

#[tokio::test(start_paused = true)]
async fn record_limit_keeps_the_newest_attempts_and_exact_counts() {
    let mock = MockProvider::new(Scenario::new(1));
    mock.set_record_limit(2);
    for model in ["a", "b", "a", "c"] {
        send(&mock, chat(model, false)).await.unwrap();
    }
    let kept: Vec<u64> = mock.attempts().iter().map(|a| a.seq).collect();
    assert_eq!(kept, [2, 3]);
    assert_eq!(mock.attempt_count(), 4);
    assert_eq!(mock.attempts_for("a"), 2);
    mock.set_record_limit(0);
    assert!(mock.attempts().is_empty());
    send(&mock, chat("a", false)).await.unwrap();
    assert!(mock.attempts().is_empty());
    assert_eq!(mock.attempts_for("a"), 3);
    mock.reset_records();
    assert_eq!((mock.attempt_count(), mock.attempts_for("a")), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn stream_pings_come_first_then_the_usual_chunks() {
    let mock = MockProvider::new(
        Scenario::new(1).model(
            "m",
            ModelPlan::ok()
                .stream_pings(2)
                .stream_chunks(1)
                .chunk_delay(Duration::from_millis(10)),
        ),
    );
    let start = Instant::now();
    let mut body = send(&mock, chat("m", true)).await.unwrap().into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        frames.push((start.elapsed(), String::from_utf8(data.to_vec()).unwrap()));
    }
    let ping = "event: ping\ndata: {\"type\": \"ping\"}\n\n";
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[0], (Duration::ZERO, ping.to_owned()));
    assert_eq!(frames[1], (Duration::from_millis(10), ping.to_owned()));
    assert!(frames[2].1.starts_with("data: {"));
    assert_eq!(
        frames[3],
        (Duration::from_millis(30), "data: [DONE]\n\n".to_owned())
    );
}
