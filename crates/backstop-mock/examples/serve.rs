//! Serves a scenario file over HTTP until Ctrl-C, printing each attempt as it
//! arrives. For pointing real clients (the official SDKs, curl) at the mock:
//!
//! ```text
//! cargo run -p backstop-mock --example serve -- scenario.toml 127.0.0.1:8080
//! curl -s http://127.0.0.1:8080/v1/chat/completions -d '{"model":"gpt-4o"}'
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use backstop_mock::{MockProvider, MockServer, Scenario};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let scenario = match args.next() {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read scenario file {path}: {e}"))?;
            if path.ends_with(".json") {
                Scenario::from_json_str(&text)?
            } else {
                Scenario::from_toml_str(&text)?
            }
        }
        None => Scenario::new(0),
    };
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned())
        .parse()
        .map_err(|e| format!("the second argument must be an address like 127.0.0.1:8080: {e}"))?;

    let provider = MockProvider::new(scenario);
    let server = MockServer::start(provider.clone(), addr).await?;
    println!("backstop-mock serving at {}", server.base_url());

    let mut shown = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let attempts = provider.attempts();
                for a in attempts.iter().skip(shown) {
                    println!(
                        "#{} {:>8.3}s {} {} model={} stream={} -> {}",
                        a.seq,
                        a.since_start.as_secs_f64(),
                        a.method,
                        a.uri.path(),
                        a.model.as_deref().unwrap_or("-"),
                        a.stream,
                        a.fault.name(),
                    );
                }
                shown = attempts.len();
            }
        }
    }
    server.shutdown().await;
    Ok(())
}
