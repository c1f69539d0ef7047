//! Every invalid stack configuration is refused with a message that names the setting.

use std::collections::HashMap;

use std::time::Duration;

use backstop::breaker::BreakerConfig;
use backstop::budget::WindowedBudgetConfig;
use backstop::fallback::{Chains, FallbackConfig};
use backstop::retry::RetryConfig;
use backstop::{ConfigError, DEFAULT_MAX_REQUEST_BODY, StackConfig};

fn build(toml: &str, env: &[(&str, &str)]) -> Result<backstop::BackstopLayer, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    StackConfig::from_toml_str(toml)?.into_layer_with_env(|name| env.get(name).cloned())
}

fn message(toml: &str) -> String {
    match build(toml, &[]) {
        Ok(_) => panic!("config should be refused:\n{toml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_empty_config_builds_the_default_stack() {
    let layer = build("", &[]).expect("defaults are valid");
    // Each layer runs its documented default (the retry rules included: generic).
    assert_eq!(layer.retry().config(), &RetryConfig::interactive());
    assert_eq!(
        layer.breaker().breaker().store().config(),
        &BreakerConfig::default()
    );
    assert_eq!(
        layer.budget().model().config(),
        &WindowedBudgetConfig::default()
    );
    assert!(layer.budget().throttle_snapshot().is_none(), "no throttle");
    // No fallback: no targets, no chains, no deadline, the builder's limits.
    let fallback = layer.fallback().config();
    assert!(fallback.targets().is_empty());
    assert_eq!(fallback.chains(), &Chains::default());
    assert_eq!(fallback.total_deadline(), None);
    assert_eq!(fallback.min_hop_time(), Duration::ZERO);
    // FallbackConfig has no PartialEq; its Debug prints every field (credentials
    // redacted), so equal Debug is equal limits, path prefix and cooldown waits.
    assert_eq!(
        format!("{fallback:?}"),
        format!("{:?}", FallbackConfig::builder().build().unwrap())
    );
    // The body cap has no accessor; the layer's Debug prints it first.
    let debug = format!("{layer:?}");
    assert!(
        debug.starts_with(&format!(
            "BackstopLayer {{ max_request_body: {DEFAULT_MAX_REQUEST_BODY}, "
        )),
        "{debug}"
    );
}

#[test]
fn attempt_timeout_longer_than_the_deadline_is_refused() {
    let m = message("[retry]\ndeadline = \"10s\"\nattempt_timeout = \"30s\"\n");
    assert_eq!(
        m,
        "retry.attempt_timeout (30s) is longer than retry.deadline (10s): one attempt could never finish inside the deadline; lower attempt_timeout or raise deadline"
    );
    // The batch preset's own 60 s deadline counts too.
    let m = message("[retry]\npreset = \"batch\"\nattempt_timeout = \"2m\"\n");
    assert!(
        m.starts_with("retry.attempt_timeout (2m) is longer than retry.deadline (1m)"),
        "{m}"
    );
}

#[test]
fn retry_deadline_longer_than_the_total_deadline_is_refused() {
    let m = message("total_deadline = \"30s\"\n[retry]\ndeadline = \"60s\"\n");
    assert!(
        m.starts_with("retry.deadline (1m) is longer than total_deadline (30s)"),
        "{m}"
    );
}

#[test]
fn breaker_window_shorter_than_two_attempt_timeouts_is_refused() {
    let m = message("[retry]\nattempt_timeout = \"20s\"\n[breaker]\nwindow = \"30s\"\n");
    assert!(m.starts_with("breaker.window (30s) must span at least two attempt timeouts (retry.attempt_timeout = 20s)"), "{m}");
}

#[test]
fn probe_timeout_shorter_than_an_attempt_is_refused() {
    let m = message(
        "[retry]\nattempt_timeout = \"20s\"\n[breaker]\nwindow = \"60s\"\nprobe_timeout = \"5s\"\n",
    );
    assert!(
        m.starts_with("breaker.probe_timeout (5s) is shorter than retry.attempt_timeout (20s)"),
        "{m}"
    );
}

#[test]
fn a_chain_naming_an_unknown_model_is_refused() {
    let m = message(
        "[models.gpt-4o]\nupstream = \"openai\"\nbase_uri = \"https://api.openai.com/v1\"\n[chains]\nmodels = { \"gpt-4o\" = [\"gpt-5-typo\"] }\n",
    );
    assert!(m.starts_with("[models/chains]:"), "{m}");
    assert!(m.contains("gpt-5-typo"), "{m}");
}

#[test]
fn a_missing_credential_names_the_variable_and_never_a_value() {
    let toml = "[models.gpt-4o]\nupstream = \"openai\"\nbase_uri = \"https://api.openai.com/v1\"\ncredential = { env = \"OPENAI_API_KEY\" }\n";
    let m = message(toml);
    assert_eq!(
        m,
        "models.gpt-4o.credential: environment variable OPENAI_API_KEY is not set or is empty; export it or remove the credential"
    );
    // Set but empty counts as missing.
    let err = build(toml, &[("OPENAI_API_KEY", "  ")]).expect_err("refused");
    assert!(matches!(err, ConfigError::MissingCredential { .. }));
    // Present: builds, and the key never shows in Debug.
    let layer = build(toml, &[("OPENAI_API_KEY", "sk-test-very-secret-key")]).expect("builds");
    let debug = format!("{layer:?}");
    assert!(!debug.contains("very-secret"), "{debug}");
    assert!(!debug.contains("sk-test"), "{debug}");
}

#[test]
fn unknown_names_and_keys_are_refused() {
    assert_eq!(
        message("provider = \"openia\"\n"),
        "provider = \"openia\" is not known; expected one of: generic, openai, azure, anthropic, gemini"
    );
    assert_eq!(
        message("[retry]\njitter = \"fuzzy\"\n"),
        "retry.jitter = \"fuzzy\" is not known; expected one of: none, full, equal, decorrelated"
    );
    assert_eq!(
        message("[retry]\npreset = \"fast\"\n"),
        "retry.preset = \"fast\" is not known; expected one of: interactive, batch"
    );
    let m = message("[retry]\nmax_attempt = 3\n");
    assert!(
        m.starts_with("invalid configuration:") && m.contains("max_attempt"),
        "{m}"
    );
    let m = message("[retry]\ndeadline = \"soon\"\n");
    assert!(m.starts_with("invalid configuration:"), "{m}");
}

#[test]
fn each_layer_s_own_validation_is_reported_with_its_section() {
    let m = message("[retry]\nmax_attempts = 0\n");
    assert!(m.starts_with("[retry]:"), "{m}");
    let m = message("[breaker]\nfailure_ratio = 1.5\n");
    assert!(m.starts_with("[breaker]:"), "{m}");
    let m = message("[budget]\nretry_ratio = -1.0\n");
    assert!(m.starts_with("[budget]:"), "{m}");
    let m = message("max_request_body = 0\n");
    assert!(m.starts_with("[max_request_body]:"), "{m}");
}

#[test]
fn the_breaker_s_open_period_pacing_and_the_cooldown_waits_are_set_from_the_file() {
    let layer = build(
        "cooldown_waits = 3\n\
         [breaker]\n\
         open_duration = \"2s\"\n\
         max_open_duration = \"20s\"\n\
         hint_opens_at = \"3s\"\n\
         max_hinted_cooldown = \"90s\"\n\
         pacing = { backoff = 0.9, min_rate = 1.0, recovery = 0.25 }\n",
        &[],
    )
    .expect("valid");
    let breaker = layer.breaker().breaker().store().config();
    assert_eq!(breaker.open_duration, std::time::Duration::from_secs(2));
    assert_eq!(
        breaker.max_open_duration,
        std::time::Duration::from_secs(20)
    );
    assert_eq!(breaker.hint_opens_at, std::time::Duration::from_secs(3));
    assert_eq!(
        breaker.max_hinted_cooldown,
        std::time::Duration::from_secs(90)
    );
    let pacing = breaker.pacing.expect("pacing on");
    assert_eq!(pacing.backoff, 0.9);
    assert_eq!(pacing.min_rate, 1.0);
    assert_eq!(pacing.recovery, 0.25);
    assert_eq!(pacing.growth, backstop::breaker::Pacing::default().growth);
    assert_eq!(layer.fallback().config().cooldown_waits(), 3);

    let off = build("[breaker]\npacing = false\n", &[]).expect("valid");
    assert!(off.breaker().breaker().store().config().pacing.is_none());
    let on = build("[breaker]\npacing = true\n", &[]).expect("valid");
    assert_eq!(
        on.breaker().breaker().store().config().pacing,
        Some(backstop::breaker::Pacing::default())
    );
}

#[test]
fn a_pacing_backoff_outside_zero_to_one_is_refused_in_its_section() {
    let m = message("[breaker]\npacing = { backoff = 1.5 }\n");
    assert!(m.starts_with("[breaker]:"), "{m}");
    let m = message("[breaker]\npacing = { colour = 1 }\n");
    assert!(m.contains("pacing"), "{m}");
    let m = message("[breaker]\npacing = { recovery = 1.5 }\n");
    assert!(
        m.starts_with("[breaker]:") && m.contains("pacing.recovery 1.5"),
        "{m}"
    );
}

#[test]
fn the_fallback_handoff_is_a_duration_or_off() {
    let layer = build("[retry]\nfallback_handoff = \"2s\"\n", &[]).expect("valid");
    assert_eq!(
        layer.retry().config().fallback_handoff(),
        Some(std::time::Duration::from_secs(2))
    );
    let off = build("[retry]\nfallback_handoff = \"off\"\n", &[]).expect("valid");
    assert_eq!(off.retry().config().fallback_handoff(), None);
    let default = build("", &[]).expect("valid");
    assert_eq!(
        default.retry().config().fallback_handoff(),
        Some(backstop::retry::DEFAULT_FALLBACK_HANDOFF)
    );
    let m = message("[retry]\nfallback_handoff = \"soon\"\n");
    assert!(m.starts_with("[retry]:"), "{m}");
    assert!(m.contains("fallback_handoff \"soon\""), "{m}");
}

#[test]
fn the_stream_idle_timeout_is_off_by_default_set_from_the_file_and_never_zero() {
    use std::time::Duration;
    let default = build("", &[]).expect("valid");
    assert_eq!(default.retry().config().stream_idle_timeout(), None);
    let layer = build("[retry]\nstream_idle_timeout = \"5m\"\n", &[]).expect("valid");
    assert_eq!(
        layer.retry().config().stream_idle_timeout(),
        Some(Duration::from_secs(300))
    );
    let m = message("[retry]\nstream_idle_timeout = \"0s\"\n");
    assert!(m.starts_with("[retry]:"), "{m}");
    assert!(m.contains("stream_idle_timeout"), "{m}");
}

#[test]
fn the_minimum_time_left_for_a_retry_is_set_and_checked_against_both_deadlines() {
    use std::time::Duration;
    let layer = build("[retry]\nmin_attempt_time = \"2s\"\n", &[]).expect("valid");
    assert_eq!(
        layer.retry().config().min_attempt_time(),
        Duration::from_secs(2)
    );
    let default = build("", &[]).expect("valid");
    assert_eq!(default.retry().config().min_attempt_time(), Duration::ZERO);
    // Not below the retry deadline (the batch preset's 60 s counts): no retry could start.
    let m = message("[retry]\npreset = \"batch\"\nmin_attempt_time = \"60s\"\n");
    assert!(m.starts_with("[retry]:"), "{m}");
    assert!(
        m.contains("`min_attempt_time` (60s) must be shorter than the deadline (60s)"),
        "{m}"
    );
    // Nor below the total deadline.
    let m = message("total_deadline = \"5s\"\n[retry]\nmin_attempt_time = \"5s\"\n");
    assert!(m.starts_with("[retry]:"), "{m}");
    assert!(
        m.contains("must be shorter than total_deadline (5s)"),
        "{m}"
    );
    build(
        "total_deadline = \"5s\"\n[retry]\nmin_attempt_time = \"4s\"\n",
        &[],
    )
    .expect("a minimum below the total deadline is valid");
    let m = message("[retry]\nmin_attempt_time = \"soon\"\n");
    assert!(m.contains("min_attempt_time"), "{m}");
}

#[test]
fn the_minimum_time_left_for_a_fallback_hop_is_set_and_checked_against_the_total_deadline() {
    use std::time::Duration;
    let layer = build("total_deadline = \"30s\"\nmin_hop_time = \"2s\"\n", &[]).expect("valid");
    assert_eq!(
        layer.fallback().config().min_hop_time(),
        Duration::from_secs(2)
    );
    let default = build("", &[]).expect("valid");
    assert_eq!(default.fallback().config().min_hop_time(), Duration::ZERO);
    let m = message("total_deadline = \"5s\"\nmin_hop_time = \"5s\"\n");
    assert!(m.starts_with("[min_hop_time]:"), "{m}");
    assert!(
        m.contains("min_hop_time (5s) must be shorter than total_deadline (5s)"),
        "{m}"
    );
}

#[test]
fn the_readme_quickstart_builds() {
    use std::time::Duration;
    let readme = include_str!("../README.md");
    let open = "StackConfig::from_toml_str(r#\"";
    let start = readme.find(open).expect("the quickstart") + open.len();
    let end = start + readme[start..].find("\"#)").expect("its end");
    let layer = build(
        &readme[start..end],
        &[
            ("OPENAI_API_KEY", "sk-1"),
            ("ANTHROPIC_API_KEY", "sk-ant-1"),
        ],
    )
    .expect("the README's quickstart configuration builds");
    assert_eq!(
        layer.fallback().config().min_hop_time(),
        Duration::from_secs(5)
    );
    assert_eq!(
        layer.retry().config().min_attempt_time(),
        Duration::from_secs(2)
    );
}

/// The first TOML block of a file's `//!` docs, without the comment markers.
fn doc_toml(source: &str) -> String {
    let start = source
        .find("//! ```toml\n")
        .expect("a toml block in the docs");
    source[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("//! ```"))
        .map(|l| l.strip_prefix("//!").unwrap_or(l).trim_start())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_config_module_docs_example_builds() {
    build(
        &doc_toml(include_str!("../src/config.rs")),
        &[
            ("OPENAI_API_KEY", "sk-1"),
            ("ANTHROPIC_API_KEY", "sk-ant-1"),
        ],
    )
    .expect("the documented configuration builds");
}

#[test]
fn the_proxy_docs_example_builds() {
    build(
        &doc_toml(include_str!("../crates/backstop-cli/src/proxy/mod.rs")),
        &[
            ("OPENAI_API_KEY", "sk-1"),
            ("ANTHROPIC_API_KEY", "sk-ant-1"),
        ],
    )
    .expect("the proxy's documented configuration builds");
}

#[test]
fn a_long_attempt_timeout_widens_the_default_breaker_window_and_probe_timeout() {
    use std::time::Duration;
    let layer = build("[retry]\nattempt_timeout = \"90s\"\n", &[]).expect("valid");
    let breaker = layer.breaker().breaker().store().config();
    assert_eq!(breaker.window, Duration::from_secs(180));
    assert_eq!(breaker.probe_timeout, Duration::from_secs(90));
    // Short ones leave the defaults as they are.
    let layer = build("[retry]\nattempt_timeout = \"5s\"\n", &[]).expect("valid");
    let breaker = layer.breaker().breaker().store().config();
    assert_eq!(breaker.window, Duration::from_secs(30));
    assert_eq!(breaker.probe_timeout, Duration::from_secs(60));
    // One the file sets is kept, and refused when too short.
    let m = message("[retry]\nattempt_timeout = \"90s\"\n[breaker]\nwindow = \"100s\"\n");
    assert!(
        m.starts_with("breaker.window (1m 40s) must span at least two attempt timeouts"),
        "{m}"
    );
}

#[test]
fn in_code_too_the_breaker_defaults_fit_a_long_attempt_timeout_but_a_given_config_is_checked() {
    use backstop::breaker::BreakerConfig;
    use backstop::retry::RetryConfig;
    use std::time::Duration;
    let retry = RetryConfig::interactive()
        .with_attempt_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    let layer = backstop::BackstopLayer::builder()
        .retry(retry.clone())
        .build()
        .expect("the defaults are widened");
    let breaker = layer.breaker().breaker().store().config();
    assert_eq!(breaker.window, Duration::from_secs(180));
    assert_eq!(breaker.probe_timeout, Duration::from_secs(90));
    let given = backstop::BackstopLayer::builder()
        .retry(retry)
        .breaker(BreakerConfig::default())
        .build();
    assert!(matches!(
        given,
        Err(ConfigError::BreakerWindowTooShort { .. })
    ));
}

/// An attempt timeout past any real one ("no limit" written as a number) builds: the
/// breaker's window must span two of them, a product that saturates instead of
/// overflowing (the fitted default window is then the longest there is).
#[test]
fn an_attempt_timeout_of_ten_quintillion_seconds_builds_without_a_panic() {
    let toml = "[retry]\nattempt_timeout = \"10000000000000000000s\"\n";
    build(toml, &[]).expect("a huge attempt timeout is valid");
    // An explicit window cannot span two of them: refused, by name.
    let m = message(&format!("{toml}[breaker]\nwindow = \"30s\"\n"));
    assert!(
        m.starts_with(
            "breaker.window (30s) must span at least two attempt timeouts (retry.attempt_timeout = 316880878140years 3months 14days 10h 5m 52s)"
        ),
        "{m}"
    );
}
