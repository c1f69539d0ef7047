//! Every hop's request says whether another model can take the request after it
//! (`FallbackAvailable`), so the retry layer inside can hand a hinted failure over
//! at once instead of waiting it out.

use std::sync::{Arc, Mutex};

use backstop_classify::{
    Classification, Failure, FailureKind, FallbackAvailable, ModelRoute, ReplayBody,
};
use backstop_fallback::{FallbackConfig, FallbackLayer, Target};
use http::{Request, Response};
use tower::{Layer, ServiceExt};

/// Answers 503 (classified as overloaded) for every model: every hop is tried.
/// Records each hop's model and whether it carried the marker.
async fn hops(config: FallbackConfig) -> Vec<(String, bool)> {
    let seen: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let record = seen.clone();
    let inner = tower::service_fn(move |request: Request<ReplayBody>| {
        let model = request
            .extensions()
            .get::<ModelRoute>()
            .map(|r| r.model.to_string())
            .unwrap_or_default();
        let marked = request.extensions().get::<FallbackAvailable>().is_some();
        record.lock().unwrap().push((model, marked));
        async move {
            let mut response = Response::new(String::from("overloaded"));
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            response
                .extensions_mut()
                .insert(Classification::Failure(Failure::new(
                    FailureKind::Overloaded,
                )));
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let request = Request::post("http://proxy.local/v1/chat/completions")
        .body(ReplayBody::from(r#"{"model":"a","messages":[]}"#))
        .unwrap();
    let response = FallbackLayer::new(config)
        .layer(inner)
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    seen.lock().unwrap().clone()
}

fn target(model: &str) -> Target {
    Target::new("up", format!("http://{model}.test/v1"))
}

#[tokio::test]
async fn each_hop_but_the_last_of_its_chain_is_marked() {
    let config = FallbackConfig::builder()
        .target("a", target("a"))
        .target("b", target("b"))
        .target("c", target("c"))
        .chain("a", ["b", "c"])
        .build()
        .unwrap();
    assert_eq!(
        hops(config).await,
        [
            ("a".to_string(), true),
            ("b".to_string(), true),
            ("c".to_string(), false)
        ]
    );
}

#[tokio::test]
async fn a_model_without_a_chain_is_never_marked() {
    let config = FallbackConfig::builder()
        .target("a", target("a"))
        .build()
        .unwrap();
    assert_eq!(hops(config).await, [("a".to_string(), false)]);
}

#[tokio::test]
async fn a_model_covered_by_the_default_chain_is_marked_and_the_last_one_is_not() {
    let config = FallbackConfig::builder()
        .target("a", target("a"))
        .target("b", target("b"))
        .default_chain(["b"])
        .build()
        .unwrap();
    assert_eq!(
        hops(config).await,
        [("a".to_string(), true), ("b".to_string(), false)]
    );
}
