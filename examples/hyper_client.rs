//! The whole Backstop stack around a hyper-util client, against the mock provider on
//! loopback: the primary is rate limited twice (Retry-After: 1), then serves.
//!
//! `cargo run --example hyper_client`

use backstop::BackstopLayer;
use backstop::classify::{AttemptLog, ReplayBody};
use backstop::fallback::ServedBy;
use backstop::mock::{Fault, MockServer, ModelPlan, Scenario};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limited = Fault::OpenAiRateLimit {
        retry_after: Some("1".into()),
        retry_after_ms: None,
    };
    let scenario = Scenario::new(7).model("gpt-4o", ModelPlan::script([limited.clone(), limited]));
    let server = MockServer::start(scenario, "127.0.0.1:0".parse()?).await?;

    // Any tower::Service<http::Request<_>> works as the transport; here, hyper-util's
    // client over plain HTTP (use hyper-rustls' connector for HTTPS providers).
    let transport = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
    let client = ServiceBuilder::new()
        .layer(BackstopLayer::builder().build()?)
        .service(transport);

    let request = http::Request::post(format!("{}/chat/completions", server.base_url()))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}]}"#.to_string())?;
    let response = client.oneshot(request).await?;

    println!("status: {}", response.status());
    if let Some(log) = response.extensions().get::<AttemptLog>() {
        for a in &log.attempts {
            println!(
                "  attempt {}: {:?} after waiting {:?}",
                a.number,
                a.status.map(|s| s.as_u16()),
                a.waited
            );
        }
    }
    if let Some(served) = response.extensions().get::<ServedBy>() {
        println!(
            "served by {} (fallback fired: {})",
            served.model, served.fallback_fired
        );
    }
    let body = response.into_body().collect().await?.to_bytes();
    println!("body: {}", String::from_utf8_lossy(&body));
    println!(
        "the provider saw {} attempts",
        server.provider().attempt_count()
    );
    server.shutdown().await;
    Ok(())
}
