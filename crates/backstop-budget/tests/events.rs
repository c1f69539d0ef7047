//! Tracing events: on transitions only, and rate-limited.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_budget::{RetryBudgetLayer, WindowedBudget, WindowedBudgetConfig};
use support::{Provider, ScriptedRetry, request};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// Collects everything the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn exhaustion_is_warned_at_most_once_per_ten_seconds() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // Ratio 1, no floor: each request pays for exactly one retry, so every request
    // flips the budget from "has balance" to "exhausted" once.
    let layer = RetryBudgetLayer::builder(
        WindowedBudget::new(WindowedBudgetConfig {
            window: Duration::from_secs(10),
            min_retries_per_sec: 0.0,
            retry_ratio: 1.0,
        })
        .unwrap(),
    )
    .name("anthropic")
    .build();
    let svc = layer.layer(ScriptedRetry::new(Provider::always(529), 3, Duration::ZERO));
    let start = Instant::now();
    for id in 0..20u64 {
        tokio::time::sleep_until(start + Duration::from_secs(id)).await;
        svc.clone().oneshot(request(id)).await.unwrap();
    }
    let s = layer.snapshot();
    assert_eq!((s.retries_allowed, s.retries_refused), (20, 20));

    let warnings: Vec<String> = captured
        .lines()
        .into_iter()
        .filter(|l| l.contains("WARN"))
        .collect();
    // 20 transitions over 19 s: warned at 0 s and at 10 s only.
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings
            .iter()
            .all(|w| w.contains("retry budget exhausted") && w.contains("budget=anthropic"))
    );
}
