//! Reading the records: which model served, whether a fallback fired, and every
//! attempt on every model. Runs in virtual time against the in-memory mock.
//!
//! `cargo run --example served_by`

use backstop::BackstopLayer;
use backstop::fallback::{FallbackConfig, ServedBy, Target};
use backstop::mock::{Fault, MockProvider, ModelPlan, Scenario};
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The primary fails with 500s; the fallback serves.
    let mock = MockProvider::new(
        Scenario::new(3).model("gpt-4o", ModelPlan::always(Fault::OpenAiServerError)),
    );
    let fallback = FallbackConfig::builder()
        .target("gpt-4o", Target::new("openai", "http://provider.local/v1"))
        .target(
            "claude-sonnet",
            Target::new("anthropic", "http://provider.local/v1"),
        )
        .chain("gpt-4o", ["claude-sonnet"])
        .build()?;
    let client = ServiceBuilder::new()
        .layer(
            BackstopLayer::builder()
                .fallback(fallback)
                .retry_seed(1)
                .build()?,
        )
        .service(mock.clone());

    let request = http::Request::post("http://provider.local/v1/chat/completions")
        .body(r#"{"model":"gpt-4o","messages":[]}"#.to_string())?;
    let started = tokio::time::Instant::now();
    let response = client.oneshot(request).await?;
    let served = response
        .extensions()
        .get::<ServedBy>()
        .ok_or("no ServedBy record")?;

    println!(
        "requested {}, served by {} at {}, fallback fired: {}, {:?} of virtual time",
        served.requested_model,
        served.model,
        served.route.upstream,
        served.fallback_fired,
        started.elapsed()
    );
    for hop in &served.hops {
        let attempts = hop.attempts.as_ref().map_or(0, |log| log.attempts.len());
        let left_for = hop
            .failure
            .as_ref()
            .map_or("-".to_string(), |f| f.to_string());
        println!(
            "  {}: {attempts} attempt(s), left for: {left_for}",
            hop.model
        );
        for a in hop.attempts.iter().flat_map(|log| &log.attempts) {
            println!(
                "    #{} status {:?}, waited {:?}",
                a.number,
                a.status.map(|s| s.as_u16()),
                a.waited
            );
        }
    }
    println!(
        "mock: gpt-4o saw {}, claude-sonnet saw {}",
        mock.attempts_for("gpt-4o"),
        mock.attempts_for("claude-sonnet")
    );
    Ok(())
}
