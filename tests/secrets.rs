//! Keys never leak: configured with distinctive keys, the stack runs requests that
//! fall back across three providers and fail in every way the mock knows (so every
//! error path, `Display` and `Debug` runs), and no key, nor any part of one longer
//! than 4 characters, appears in any configuration type's `Debug` or serialised
//! form, any error's `Display`/`Debug` (and its sources'), any record
//! ([`ServedBy`], [`AttemptLog`], the mock's attempt records) or any response the
//! caller gets. Each provider receives its own key and nothing else: the fallback
//! provider never receives the first provider's key, nor a key the caller sent.
//!
//! All tracing output of the failure-path run (and of the other tests running beside
//! it) is captured at TRACE level (every event, with its spans' fields) and checked
//! the same way.

use std::collections::HashMap;
use std::error::Error as _;
use std::time::Duration;

use backstop::classify::{AttemptLog, ClassifiedError, StopReason};
use backstop::fallback::{Credential, FallbackConfig, Secret, ServedBy, Target};
use backstop::mock::{Attempt, Fault, MockProvider, ModelPlan, Scenario, StreamStyle};
use backstop::{BackstopLayer, StackConfig};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};

// Random-looking, so that no legitimate text shares five characters with them.
const OPENAI_KEY: &str = "sk-Zq8Wv3Kx7Jm2Np5Rt9Yb4Hc6Fd1";
const ANTHROPIC_KEY: &str = "ak-Lp4Tg7Vn2Xc9Bq6Mw3Rd8Sj5Kh1";
const GEMINI_KEY: &str = "AIzaQw2Er4Ty6Ui8Op0As1Df3Gh5Jk7";
/// A key the caller put on its own request.
const CALLER_KEY: &str = "ck-Vb5Nm8Qw1Er3Ty7Ui9Op2As4Df6";
const KEYS: [&str; 4] = [OPENAI_KEY, ANTHROPIC_KEY, GEMINI_KEY, CALLER_KEY];

const PRIMARY: &str = "gpt-4o";
const SECOND: &str = "claude-sonnet";
const THIRD: &str = "gemini-flash";

/// Panics if `text` holds any key or any part of one longer than 4 characters.
fn assert_no_key(what: &str, text: &str) {
    for key in KEYS {
        // Any substring longer than 4 characters contains one of exactly 5.
        for part in key.as_bytes().windows(5) {
            let part = std::str::from_utf8(part).expect("keys are ASCII");
            assert!(
                !text.contains(part),
                "{what} leaks {part:?}, part of a key:\n{text}"
            );
        }
    }
}

const STACK_TOML: &str = r#"
total_deadline = "30s"

[retry]
max_attempts = 2
deadline = "10s"
attempt_timeout = "2s"

[breaker]
window = "30s"
probe_timeout = "10s"

[models.gpt-4o]
upstream = "openai"
base_uri = "http://provider.local/v1"
credential = { env = "OPENAI_API_KEY", label = "openai-main" }

[models.claude-sonnet]
upstream = "anthropic"
base_uri = "http://provider.local/v1"
credential = { header = "x-api-key", env = "ANTHROPIC_API_KEY" }
headers = { "anthropic-version" = "2023-06-01" }

[models.gemini-flash]
upstream = "google"
base_uri = "http://provider.local/v1"
credential = { header = "x-goog-api-key", env = "GEMINI_API_KEY" }

[chains]
models = { "gpt-4o" = ["claude-sonnet", "gemini-flash"], "claude-sonnet" = ["gemini-flash"] }
context_length = ["gemini-flash"]
content_filter = ["claude-sonnet"]
"#;

fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_API_KEY" => Some(OPENAI_KEY.into()),
        "ANTHROPIC_API_KEY" => Some(ANTHROPIC_KEY.into()),
        "GEMINI_API_KEY" => Some(GEMINI_KEY.into()),
        _ => None,
    }
}

fn stack() -> (StackConfig, BackstopLayer) {
    let config = StackConfig::from_toml_str(STACK_TOML).expect("valid TOML");
    let layer = config
        .clone()
        .into_layer_with_env(env)
        .expect("valid stack");
    (config, layer)
}

/// The same targets built in code, for the fallback crate's own config types.
fn fallback_config() -> FallbackConfig {
    FallbackConfig::builder()
        .target(
            PRIMARY,
            Target::new("openai", "http://provider.local/v1")
                .credential("authorization", format!("Bearer {OPENAI_KEY}"))
                .credential_label("openai-main"),
        )
        .target(
            SECOND,
            Target::new("anthropic", "http://provider.local/v1")
                .credential("x-api-key", ANTHROPIC_KEY),
        )
        .target(
            THIRD,
            Target::new("google", "http://provider.local/v1")
                .credential("x-goog-api-key", GEMINI_KEY),
        )
        .chain(PRIMARY, [SECOND, THIRD])
        .build()
        .expect("valid fallback config")
}

#[test]
fn no_config_type_prints_a_key() {
    let (config, layer) = stack();
    assert_no_key("StackConfig Debug", &format!("{config:?} {config:#?}"));
    assert_no_key("BackstopLayer Debug", &format!("{layer:?} {layer:#?}"));
    let builder = config.into_builder(env).expect("valid builder");
    assert_no_key(
        "BackstopBuilder Debug",
        &format!("{builder:?} {builder:#?}"),
    );

    let fallback = fallback_config();
    assert_no_key(
        "FallbackConfig Debug",
        &format!("{fallback:?} {fallback:#?}"),
    );
    let json = serde_json::to_string(&fallback).expect("serialisable");
    assert_no_key("FallbackConfig as JSON", &json);
    assert_eq!(fallback.targets().len(), 3);
    for (name, target) in fallback.targets() {
        assert_no_key(name, &format!("{target:?} {target:#?}"));
        let credential: &Credential = target.credential.as_ref().expect("configured");
        assert_no_key(name, &format!("{credential:?} {credential:#?}"));
        assert_no_key(
            name,
            &format!("{} {:?}", credential.value, credential.value),
        );
        // The value is there, only never printed.
        assert!(KEYS.iter().any(|k| credential.value.expose().contains(k)));
    }
    let secret = Secret::new(OPENAI_KEY);
    assert_no_key("Secret", &format!("{secret} {secret:?} {secret:#?}"));
    let layer = backstop::fallback::FallbackLayer::new(fallback);
    assert_no_key("FallbackLayer Debug", &format!("{layer:?}"));
}

#[test]
fn a_key_in_a_base_uri_or_an_extra_header_never_prints() {
    // A gateway's key in an extra header, a key in the base URI's user information
    // and Gemini's `?key=` in its query.
    let target = Target::new(
        "google",
        format!("https://proxy-user:{OPENAI_KEY}@provider.local/v1?key={GEMINI_KEY}"),
    )
    .header("helicone-auth", format!("Bearer {ANTHROPIC_KEY}"));
    assert_no_key("Target Debug", &format!("{target:?} {target:#?}"));
    let fallback = FallbackConfig::builder()
        .target(THIRD, target)
        .build()
        .expect("valid fallback config");
    assert_no_key(
        "FallbackConfig Debug",
        &format!("{fallback:?} {fallback:#?}"),
    );
    let layer = backstop::fallback::FallbackLayer::new(fallback);
    assert_no_key("FallbackLayer Debug", &format!("{layer:?} {layer:#?}"));

    // A base URI that does not parse is named in the error, without its key.
    let error = FallbackConfig::builder()
        .target(
            THIRD,
            Target::new("google", format!("provider.local/v1 ?key={GEMINI_KEY}")),
        )
        .build()
        .expect_err("not an absolute URI");
    assert_no_key("InvalidBaseUri", &format!("{error} {error:?}"));
    assert!(
        error.to_string().contains("provider.local/v1 ?[redacted]"),
        "{error}"
    );

    // The same through the stack's TOML.
    let toml = format!(
        r#"
[models.gemini-flash]
upstream = "google"
base_uri = "https://provider.local/v1?key={GEMINI_KEY}"
headers = {{ "helicone-auth" = "Bearer {ANTHROPIC_KEY}" }}
"#
    );
    let config = StackConfig::from_toml_str(&toml).expect("valid TOML");
    assert_no_key("StackConfig Debug", &format!("{config:?} {config:#?}"));
    let layer = config.into_layer_with_env(env).expect("valid stack");
    assert_no_key("BackstopLayer Debug", &format!("{layer:?} {layer:#?}"));
}

#[test]
fn a_toml_error_on_a_line_with_a_key_does_not_quote_the_line() {
    // An unterminated string on the line that holds the key.
    let toml = format!(
        "[models.gemini-flash]\nupstream = \"google\"\nbase_uri = \"https://provider.local/v1?key={GEMINI_KEY}\n"
    );
    let error = StackConfig::from_toml_str(&toml).expect_err("unterminated string");
    let message = error.to_string();
    assert_no_key("a TOML parse error", &format!("{message} {error:?}"));
    // The place is named by line, column and key; the value is not quoted.
    assert!(
        message.starts_with("invalid configuration: line 3, column ")
            && message.contains(" (`base_uri = …`): "),
        "{message}"
    );
}

#[test]
fn a_key_pasted_where_its_variable_name_belongs_is_not_echoed() {
    // `credential` wants `{ env = "OPENAI_API_KEY" }`; the key itself is pasted.
    let toml = format!(
        "[models.gpt-4o]\nupstream = \"openai\"\nbase_uri = \"https://api.openai.com/v1\"\ncredential = \"{OPENAI_KEY}\"\n"
    );
    let error = StackConfig::from_toml_str(&toml).expect_err("a string is no credential table");
    let message = error.to_string();
    assert_no_key("a TOML type error", &format!("{message} {error:?}"));
    assert!(
        message.starts_with("invalid configuration: line 4, column ")
            && message.contains(" (`credential = …`): invalid type: string \"…\""),
        "{message}"
    );
}

#[test]
fn config_errors_never_echo_a_key() {
    // A key that is not a valid header value (a pasted newline) is refused without
    // being repeated back.
    let broken = |name: &str| env(name).map(|k| format!("{k}\nX"));
    let error = StackConfig::from_toml_str(STACK_TOML)
        .expect("valid TOML")
        .into_layer_with_env(broken)
        .map(|_| ())
        .expect_err("a key with a newline is no header value");
    assert_no_key("ConfigError", &format!("{error} {error:?}"));

    // An invalid config whose keys are all present.
    let toml = STACK_TOML.replace(
        r#""claude-sonnet" = ["gemini-flash"]"#,
        r#""claude-sonnet" = ["gpt-5-typo"]"#,
    );
    let error = StackConfig::from_toml_str(&toml)
        .expect("valid TOML")
        .into_layer_with_env(env)
        .map(|_| ())
        .expect_err("a chain naming an unknown model");
    assert_no_key("ConfigError", &format!("{error} {error:?}"));
}

/// One of every fault, each provider's formats, transport and stream failures.
/// Every fault the mock knows (so a new kind is covered here automatically), plus the
/// variants of a few that exercise other paths.
fn every_fault() -> Vec<Fault> {
    let mut all = Fault::one_of_each();
    let extra = vec![
        Fault::Ok,
        Fault::OpenAiContentFilterFinish,
        Fault::OpenAiRateLimit {
            retry_after: Some("1".into()),
            retry_after_ms: None,
        },
        Fault::OpenAiRequestTooLarge,
        Fault::OpenAiInsufficientQuota,
        Fault::OpenAiBillingLimit {
            code: "credit_balance_exhausted".into(),
        },
        Fault::OpenAiSlowDown,
        Fault::OpenAiContextLength,
        Fault::OpenAiContentPolicy,
        Fault::OpenAiModelNotFound,
        Fault::OpenAiServerError,
        Fault::OpenAiOverloaded,
        Fault::BadGateway,
        Fault::GatewayTimeout,
        Fault::Unauthorized,
        Fault::InvalidRequest,
        Fault::AzureRateLimit {
            message_seconds: 6,
            retry_after: Some("-1".into()),
            retry_after_ms: None,
        },
        Fault::AzureContentFilter,
        Fault::AnthropicOverloaded,
        Fault::AnthropicRateLimit { retry_after: None },
        Fault::AnthropicSpendLimit,
        Fault::AnthropicPromptTooLong,
        Fault::AnthropicError {
            status: 403,
            error_type: "permission_error".into(),
            message: "Your API key does not have permission to use the specified resource.".into(),
        },
        Fault::GeminiResourceExhausted {
            retry_delay: Some("1s".into()),
            per_day: true,
        },
        Fault::GeminiUnavailable,
        Fault::GeminiDeadlineExceeded,
        Fault::Status {
            status: 418,
            headers: vec![],
            body: "teapot".into(),
        },
        Fault::OpenAiServerError.with_header("x-should-retry", "false"),
        Fault::Hang,
        Fault::ConnectRefused,
        Fault::ResetBeforeHead,
        Fault::ResetAfterHead,
        Fault::ResetAfterChunks { chunks: 1 },
        Fault::StreamErrorAfter {
            chunks: 0,
            style: StreamStyle::OpenAi,
        },
        Fault::StreamErrorAfter {
            chunks: 2,
            style: StreamStyle::Anthropic,
        },
    ];
    for fault in extra {
        if !all.contains(&fault) {
            all.push(fault);
        }
    }
    all
}

/// Everything a caller (or its logs) could print about one outcome.
async fn printout(
    outcome: Result<
        http::Response<
            impl hyper::body::Body<Data = bytes::Bytes, Error = ClassifiedError> + std::fmt::Debug,
        >,
        ClassifiedError,
    >,
) -> String {
    let mut out = String::new();
    match outcome {
        Ok(response) => {
            out += &format!("{response:?}\n{:?}\n", response.headers());
            if let Some(served) = response.extensions().get::<ServedBy>() {
                out += &format!("{served:?}\n{served:#?}\n");
            }
            if let Some(log) = response.extensions().get::<AttemptLog>() {
                out += &format!("{log:?}\n");
            }
            let mut body = std::pin::pin!(response.into_body());
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            out += &String::from_utf8_lossy(data);
                        }
                    }
                    Err(error) => {
                        out += &error_printout(&error);
                        break;
                    }
                }
            }
        }
        Err(error) => out += &error_printout(&error),
    }
    out
}

fn error_printout(error: &ClassifiedError) -> String {
    let mut out = format!("{error}\n{error:?}\n{error:#?}\n");
    let mut source = error.source();
    while let Some(s) = source {
        out += &format!("{s}\n{s:?}\n");
        source = s.source();
    }
    if let Some(served) = ServedBy::of_error(error) {
        out += &format!("{served:?}\n");
        for hop in &served.hops {
            out += &format!("{:?}\n", hop.attempts);
        }
    }
    if let Some(log) = error.attempt_log() {
        out += &format!("{log:?}\n");
    }
    out
}

fn credential_headers(attempt: &Attempt) -> HashMap<&'static str, Option<String>> {
    ["authorization", "x-api-key", "x-goog-api-key", "api-key"]
        .into_iter()
        .map(|name| (name, attempt.header(name).map(str::to_owned)))
        .collect()
}

/// Each provider got exactly its own key, and no header it got holds any other.
fn assert_each_provider_got_only_its_key(attempts: &[Attempt]) {
    for attempt in attempts {
        let model = attempt.model.as_deref().unwrap_or_default();
        let (header, value, own) = match model {
            PRIMARY => ("authorization", format!("Bearer {OPENAI_KEY}"), OPENAI_KEY),
            SECOND => ("x-api-key", ANTHROPIC_KEY.to_owned(), ANTHROPIC_KEY),
            THIRD => ("x-goog-api-key", GEMINI_KEY.to_owned(), GEMINI_KEY),
            other => panic!("unexpected model {other}"),
        };
        for (name, got) in credential_headers(attempt) {
            if name == header {
                assert_eq!(got.as_deref(), Some(value.as_str()), "{model}: {name}");
            } else {
                assert_eq!(got, None, "{model} got a {name} header");
            }
        }
        for (name, got) in &attempt.headers {
            let got = String::from_utf8_lossy(got.as_bytes());
            for key in KEYS.iter().filter(|k| **k != own) {
                assert!(!got.contains(key), "{model} received another key in {name}");
            }
        }
        assert_no_key("a mock attempt record", &format!("{attempt:?}"));
    }
}

/// Everything the fmt subscriber writes, kept for inspection.
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn every_failure_path_across_providers_keeps_every_key_private() {
    // A process-wide subscriber: a thread-scoped one (`set_default`) misses events
    // whose callsite interest another test thread computes at the same moment
    // (tracing-core caches interest process-wide), which failed this test about one
    // run in fifteen. Process-wide, it also captures the other tests' events, which
    // the key check below covers too. No other test in this binary sets one.
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber)
        .expect("no other test in this binary sets a global subscriber");
    let mut fallbacks = 0;
    for (i, fault) in every_fault().into_iter().enumerate() {
        // The primary fails this way; the second fails this way once then serves;
        // the third always fails this way: every hop sends a key, errors and
        // successes both come back.
        let scenario = Scenario::new(i as u64)
            .model(PRIMARY, ModelPlan::always(fault.clone()))
            .model(SECOND, ModelPlan::script([fault.clone()]))
            .model(THIRD, ModelPlan::always(fault.clone()));
        for stream in [false, true] {
            for model in [PRIMARY, SECOND, THIRD] {
                // A fresh stack each time: breakers opened by one run stay shut.
                let (_, layer) = stack();
                let mock = MockProvider::new(scenario.clone());
                let service = layer.layer(mock.clone());
                let body = format!(
                    r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
                );
                let request = http::Request::post("http://provider.local/v1/chat/completions")
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("secrets-{i}"))
                    .body(body)
                    .expect("valid request");
                let outcome =
                    tokio::time::timeout(Duration::from_secs(120), service.oneshot(request))
                        .await
                        .expect("the total deadline ends every request");
                let text = printout(outcome).await;
                assert_no_key(&format!("the outcome of {fault:?} on {model}"), &text);
                let attempts = mock.attempts();
                assert!(!attempts.is_empty());
                let models: std::collections::HashSet<_> =
                    attempts.iter().filter_map(|a| a.model.clone()).collect();
                if models.len() > 1 {
                    fallbacks += 1;
                }
                assert_each_provider_got_only_its_key(&attempts);
            }
        }
    }
    assert!(
        fallbacks > 40,
        "fallback across providers ran ({fallbacks} times)"
    );
    let text = log.text();
    // The capture worked: the layers logged attempts and fallbacks.
    assert!(
        text.lines().count() > 200,
        "{} log lines",
        text.lines().count()
    );
    assert!(text.contains("fallback"), "no fallback event captured");
    assert_no_key("the tracing output", &text);
}

#[tokio::test(start_paused = true)]
async fn a_key_the_caller_sent_never_reaches_the_fallback_provider() {
    // The primary is not a configured target: the request goes where the caller
    // sent it, with the caller's own key. The fallback target has its own key, and
    // must get only that.
    let fallback = FallbackConfig::builder()
        .target(
            SECOND,
            Target::new("anthropic", "http://provider.local/v1")
                .credential("x-api-key", ANTHROPIC_KEY),
        )
        .chain(PRIMARY, [SECOND])
        .build()
        .expect("valid fallback config");
    let layer = BackstopLayer::builder()
        .fallback(fallback)
        .build()
        .expect("valid stack");
    let mock = MockProvider::new(
        Scenario::new(5)
            .model(PRIMARY, ModelPlan::always(Fault::OpenAiInsufficientQuota))
            .model(SECOND, ModelPlan::ok()),
    );
    // The caller's key in every form a provider or gateway takes one: headers, a
    // session cookie, the account it bills to, Gemini's `?key=` in the query.
    let request = http::Request::post(format!(
        "http://provider.local/v1/chat/completions?trace=1&key={CALLER_KEY}"
    ))
    .header("authorization", format!("Bearer {CALLER_KEY}"))
    .header("x-api-key", CALLER_KEY)
    .header("cookie", format!("session={CALLER_KEY}"))
    .header("openai-organization", format!("org-{CALLER_KEY}"))
    .header("openai-project", format!("proj_{CALLER_KEY}"))
    .header("helicone-auth", format!("Bearer {CALLER_KEY}"))
    .header("ocp-apim-subscription-key", CALLER_KEY)
    .body(format!(r#"{{"model":"{PRIMARY}","messages":[]}}"#))
    .expect("valid request");

    let response = layer.layer(mock.clone()).oneshot(request).await;
    let text = printout(response).await;

    assert_no_key("the served response", &text);
    let attempts = mock.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].model.as_deref(), Some(PRIMARY));
    assert_eq!(
        attempts[0].header("authorization"),
        Some(format!("Bearer {CALLER_KEY}").as_str()),
        "the caller's key goes where the caller sent it"
    );
    assert_eq!(attempts[1].model.as_deref(), Some(SECOND));
    assert_eq!(attempts[1].header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(attempts[1].header("authorization"), None);
    for name in [
        "cookie",
        "openai-organization",
        "openai-project",
        "helicone-auth",
        "ocp-apim-subscription-key",
    ] {
        assert_eq!(attempts[1].header(name), None, "{name}");
    }
    // The rest of the caller's query goes on; its key does not.
    assert_eq!(attempts[1].uri.query(), Some("trace=1"));
    for (name, value) in &attempts[1].headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains(CALLER_KEY),
            "the fallback provider got the caller's key in {name}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_configured_target_gets_its_own_key_never_the_one_the_caller_sent() {
    let (_, layer) = stack();
    let mock = MockProvider::new(
        Scenario::new(6)
            .model(PRIMARY, ModelPlan::always(Fault::OpenAiInsufficientQuota))
            .model(SECOND, ModelPlan::ok()),
    );
    let request = http::Request::post("http://provider.local/v1/chat/completions")
        .header("authorization", format!("Bearer {CALLER_KEY}"))
        .header("api-key", CALLER_KEY)
        .body(format!(r#"{{"model":"{PRIMARY}","messages":[]}}"#))
        .expect("valid request");

    let response = layer.layer(mock.clone()).oneshot(request).await;
    let text = printout(response).await;

    assert_no_key("the served response", &text);
    let models: Vec<_> = mock.attempts().iter().map(|a| a.model.clone()).collect();
    assert_eq!(models, [Some(PRIMARY.into()), Some(SECOND.into())]);
    // Each configured target got exactly its own key; the caller's went nowhere.
    assert_each_provider_got_only_its_key(&mock.attempts());
}

#[tokio::test(start_paused = true)]
async fn breaker_and_budget_refusals_print_no_key() {
    // One stack for many requests against providers that keep failing, with an
    // empty retry budget: retries are refused and the breakers open, so their
    // refusals are printed too.
    let toml = STACK_TOML.replace(
        "[breaker]",
        "[budget]\nretry_ratio = 0.0\nmin_retries_per_sec = 0.0\n\n[breaker]",
    );
    let layer = StackConfig::from_toml_str(&toml)
        .expect("valid TOML")
        .into_layer_with_env(env)
        .expect("valid stack");
    let mock = MockProvider::new(
        Scenario::new(8)
            .model(PRIMARY, ModelPlan::always(Fault::OpenAiOverloaded))
            .model(SECOND, ModelPlan::always(Fault::AnthropicOverloaded))
            .model(THIRD, ModelPlan::always(Fault::GeminiUnavailable)),
    );
    let mut refusals = std::collections::HashSet::new();
    let mut budget_refused = false;
    for i in 0..40 {
        let request = http::Request::post("http://provider.local/v1/chat/completions")
            .body(format!(r#"{{"model":"{PRIMARY}","messages":[],"n":{i}}}"#))
            .expect("valid request");
        let outcome = layer.clone().layer(mock.clone()).oneshot(request).await;
        if let Err(error) = &outcome {
            refusals.insert(error.kind());
            for hop in ServedBy::of_error(error).map_or(&[][..], |s| &s.hops[..]) {
                if hop.attempts.as_ref().and_then(|l| l.stop) == Some(StopReason::BudgetExhausted) {
                    budget_refused = true;
                }
            }
        }
        if let Ok(response) = &outcome
            && let Some(served) = response.extensions().get::<ServedBy>()
        {
            for hop in &served.hops {
                if let Some(failure) = &hop.failure {
                    refusals.insert(failure.kind);
                }
                if hop.attempts.as_ref().and_then(|l| l.stop) == Some(StopReason::BudgetExhausted) {
                    budget_refused = true;
                }
            }
        }
        let text = printout(outcome).await;
        assert_no_key("a refused request", &text);
    }
    assert!(
        refusals.contains(&backstop::classify::FailureKind::BreakerOpen),
        "the breakers opened: {refusals:?}"
    );
    assert!(budget_refused, "the budget refused a retry");
    assert_each_provider_got_only_its_key(&mock.attempts());
}
