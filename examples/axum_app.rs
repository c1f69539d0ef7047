//! An axum app whose handler calls an LLM provider through the Backstop stack. The
//! provider here is the mock on loopback; point the targets at real providers in
//! production.
//!
//! `cargo run --example axum_app`, then `curl localhost:3000/ask?q=hi`. With
//! `--once` it serves a single request from itself and exits (used as a smoke test).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use backstop::BackstopLayer;
use backstop::classify::{BoxError, ReplayBody};
use backstop::fallback::{FallbackConfig, ServedBy, Target};
use backstop::mock::{Fault, MockServer, ModelPlan, Scenario};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

type Llm = BoxCloneSyncService<
    http::Request<String>,
    (http::StatusCode, Option<ServedBy>, bytes::Bytes),
    BoxError,
>;

#[derive(serde::Deserialize)]
struct Ask {
    q: String,
}

async fn ask(
    State(llm): State<Llm>,
    Query(ask): Query<Ask>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    let body = serde_json::json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": ask.q }] });
    let request = http::Request::post("http://provider.local/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.to_string())
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let (status, served, bytes) = llm
        .oneshot(request)
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    let answer: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok(Json(serde_json::json!({
        "status": status.as_u16(),
        "served_by": served.as_ref().map(|s| s.model.to_string()),
        "fallback_fired": served.as_ref().is_some_and(|s| s.fallback_fired),
        "answer": answer["choices"][0]["message"]["content"],
    })))
}

/// Reads the whole response, keeping the record of which model served it.
async fn read_response<B>(
    response: http::Response<B>,
) -> Result<(StatusCode, Option<ServedBy>, bytes::Bytes), BoxError>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<BoxError>,
{
    let status = response.status();
    let served = response.extensions().get::<ServedBy>().cloned();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes();
    Ok((status, served, bytes))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The primary's quota is gone; the fallback serves.
    let scenario =
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota));
    let mock = MockServer::start(scenario, "127.0.0.1:0".parse()?).await?;
    let base = mock.base_url();
    let fallback = FallbackConfig::builder()
        .target("gpt-4o", Target::new("openai", base.as_str()))
        .target("claude-sonnet", Target::new("anthropic", base.as_str()))
        .chain("gpt-4o", ["claude-sonnet"])
        .build()?;
    let transport = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
    let stack = ServiceBuilder::new()
        .map_request(|request: http::Request<String>| request)
        .layer(BackstopLayer::builder().fallback(fallback).build()?)
        .service(transport)
        .map_err(BoxError::from)
        .and_then(read_response);
    let app = Router::new()
        .route("/ask", get(ask))
        .with_state(BoxCloneSyncService::new(stack));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    if std::env::args().any(|a| a == "--once") {
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = Client::builder(TokioExecutor::new()).build_http::<String>();
        let uri: http::Uri = format!("http://{addr}/ask?q=hi").parse()?;
        let response = client.get(uri).await?;
        let body = response.into_body().collect().await?.to_bytes();
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    println!("listening on http://{addr}/ask?q=hello");
    axum::serve(listener, app).await?;
    Ok(())
}
