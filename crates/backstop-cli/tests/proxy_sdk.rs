//! The official `openai` Python SDK calling `backstop proxy` (in-process, on
//! loopback) in front of backstop-mock: a completion, a stream, a fallback, and a
//! final failure on which the SDK makes exactly one request because of
//! `x-should-retry: false`.
//!
//! The SDK is installed once into `target/sdk-venv` (a pinned version, from the
//! package registry) and reused afterwards. If it cannot be installed, these tests
//! FAIL with pip's message: a missing SDK must never look like a pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use backstop::mock::{Fault, MockServer, ModelPlan, Scenario};
use backstop::retry::{Backoff, RetryConfig};
use backstop_cli::proxy::{self, ProxyConfig, ProxyHandle};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The SDK version the tests pin.
const OPENAI_SDK: &str = "openai==3.54.0";

/// The venv is built by at most one test at a time; the others wait and reuse it.
static VENV: Mutex<()> = Mutex::new(());

/// `target/sdk-venv`, next to the `tmp` directory cargo gives integration tests.
fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|target| target.join("sdk-venv"))
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
}

/// The venv's python with the pinned SDK importable, creating it when needed.
fn python() -> PathBuf {
    let _one_installer = VENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let venv = venv_dir();
    let python = venv.join("bin").join("python");
    // Written only after a successful install, so a half-made venv is redone.
    let marker = venv.join(format!(".installed-{OPENAI_SDK}"));
    if marker.exists() && python.exists() {
        return python;
    }
    run(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
        "python3 -m venv (on Debian, the python3-venv package provides it)",
    );
    run(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OPENAI_SDK,
        ]),
        &format!(
            "pip install {OPENAI_SDK} into {}: the SDK tests need the Python package registry",
            venv.display()
        ),
    );
    std::fs::write(&marker, OPENAI_SDK).expect("write the venv's marker");
    python
}

fn run(command: &mut Command, what: &str) {
    match command.output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => panic!("{what}: cannot run it: {error}"),
    }
}

/// Runs `tests/sdk/<script>` against the proxy and parses the JSON line it prints.
async fn sdk(script: &str, proxy: &ProxyHandle) -> serde_json::Value {
    let python = tokio::task::spawn_blocking(python)
        .await
        .expect("venv ready");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let base_url = proxy.base_url();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(&script)
            .env("OPENAI_BASE_URL", base_url)
            .env("OPENAI_API_KEY", "sk-caller-key-for-the-proxy")
            .env_remove("OPENAI_ORG_ID")
            .env_remove("OPENAI_PROJECT_ID")
            .output()
    })
    .await
    .unwrap()
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

async fn start(scenario: Scenario) -> (MockServer, ProxyHandle) {
    let mock = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock binds loopback");
    let config = ProxyConfig::from_toml_str(&format!(
        r#"
        provider = "openai"
        [models.gpt-4o]
        upstream = "openai"
        base_uri = "{url}"
        [models.claude-sonnet]
        upstream = "anthropic"
        base_uri = "{url}"
        [chains]
        models = {{ "gpt-4o" = ["claude-sonnet"] }}
        "#,
        url = mock.base_url()
    ))
    .unwrap()
    .map_stack(|builder| {
        builder.retry(
            RetryConfig::interactive()
                .with_backoff(
                    Backoff::new(
                        std::time::Duration::from_millis(1),
                        2.0,
                        std::time::Duration::from_millis(4),
                    )
                    .unwrap(),
                )
                .with_max_attempts(3)
                .unwrap(),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy::serve(config, listener).await.expect("proxy starts");
    (mock, proxy)
}

/// Requests the proxy received, read from its own `/metrics`.
async fn proxy_requests(proxy: &ProxyHandle) -> u64 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://{}/metrics", proxy.local_addr());
    let response = client.get(uri.parse().unwrap()).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(text.to_vec())
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("backstop_proxy_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_completion_through_the_proxy() {
    let (mock, proxy) = start(Scenario::new(1)).await;
    let got = sdk("completion.py", &proxy).await;
    assert_eq!(
        got,
        serde_json::json!({"model": "gpt-4o", "content": "mock(gpt-4o) w1 w2", "finish_reason": "stop"})
    );
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(proxy_requests(&proxy).await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_streamed_completion_through_the_proxy() {
    let plan = ModelPlan::ok().stream_chunks(5);
    let (mock, proxy) = start(Scenario::new(1).model("gpt-4o", plan)).await;
    let got = sdk("stream.py", &proxy).await;
    assert_eq!(
        got,
        serde_json::json!({"chunks": 5, "content": "mock(gpt-4o) w1 w2 w3 w4", "finish_reason": "stop"})
    );
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_sees_the_fallback_in_the_response_headers() {
    let scenario =
        Scenario::new(1).model("gpt-4o", ModelPlan::always(Fault::OpenAiInsufficientQuota));
    let (mock, proxy) = start(scenario).await;
    let got = sdk("fallback.py", &proxy).await;
    assert_eq!(
        got,
        serde_json::json!({
            "status": 200,
            "x-backstop-model": "claude-sonnet",
            "x-backstop-fallback": "true",
            "x-backstop-attempts": "2",
            "model": "claude-sonnet",
        })
    );
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 1);
    assert_eq!(mock.provider().attempts_for("claude-sonnet"), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_makes_exactly_one_request_on_a_final_failure() {
    // 500s everywhere: a status the SDK retries twice by default. Backstop makes 3
    // attempts on each model; without `x-should-retry: false` the SDK would send 3
    // requests and the mock would see 18 attempts.
    let scenario = Scenario::new(1).default_plan(ModelPlan::always(Fault::OpenAiServerError));
    let (mock, proxy) = start(scenario).await;
    let got = sdk("final_failure.py", &proxy).await;
    assert_eq!(
        got,
        serde_json::json!({
            "raised": "InternalServerError",
            "status": 500,
            "x-should-retry": "false",
            "x-backstop-attempts": "6",
        })
    );
    assert_eq!(proxy_requests(&proxy).await, 1, "the SDK did not retry");
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 3);
    assert_eq!(mock.provider().attempts_for("claude-sonnet"), 3);
    assert_eq!(mock.provider().attempt_count(), 6);
    proxy.shutdown().await;
}
