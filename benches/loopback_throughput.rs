//! Loopback HTTP throughput and latency, with and without the Backstop stack, in one
//! run: a hyper-util client → (BackstopLayer) → the mock provider's hyper server on
//! 127.0.0.1, answering instantly, at a fixed concurrency.
//!
//! Full run: `cargo bench -p backstop --bench loopback_throughput` (cargo passes `--bench`)
//! (env `LOOPBACK_REQUESTS` per variant, default 200 000; `LOOPBACK_CONCURRENCY`,
//! default 32; `LOOPBACK_ROUNDS`, default 20). Under `cargo test --all-targets` it runs
//! a short smoke version.
//!
//! The variants alternate in rounds (A B, B A, A B, …) so drift in machine load affects
//! both alike. It prints the ratio over all rounds together and the median of the
//! per-round ratios: on a shared 2-core machine single runs of the total varied from
//! 94 % to 100 % with the same binary, and the median of paired rounds is the steadier
//! figure.

use std::time::{Duration, Instant};

use backstop::BackstopLayer;
use backstop::classify::ReplayBody;
use backstop::mock::{MockServer, Scenario};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceExt};

const BODY: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}]}"#;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

async fn drive<S, B>(service: S, base: &str, requests: usize, concurrency: usize) -> Run
where
    S: Service<http::Request<ReplayBody>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug + Send,
{
    let uri: http::Uri = format!("{base}/chat/completions").parse().expect("uri");
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let share = requests / concurrency + usize::from(w < requests % concurrency);
        let service = service.clone();
        let uri = uri.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(share);
            for _ in 0..share {
                let request = http::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .body(ReplayBody::new(Bytes::from_static(BODY)))
                    .expect("request");
                let t = Instant::now();
                let response = service.clone().oneshot(request).await.expect("served");
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.expect("body");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    for w in workers {
        latencies.extend(w.await.expect("worker"));
    }
    Run {
        elapsed: started.elapsed(),
        latencies,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let requests = if full {
        env_or("LOOPBACK_REQUESTS", 200_000)
    } else {
        400
    };
    let concurrency = env_or("LOOPBACK_CONCURRENCY", 32);
    let rounds = if full {
        env_or("LOOPBACK_ROUNDS", 20).max(1)
    } else {
        1
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let server = MockServer::start(Scenario::new(1), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("mock server");
        server.provider().set_record_limit(0);
        let base = server.base_url();
        let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
        let stack = tower::ServiceBuilder::new()
            .layer(BackstopLayer::builder().build().expect("stack"))
            .service(client.clone());

        let (mut bare, mut with) = (Vec::new(), Vec::new());
        let (mut bare_time, mut with_time) = (Duration::ZERO, Duration::ZERO);
        // Each round's ratio (with / without), from the two variants' back-to-back
        // runs: a burst of load from elsewhere hits a pair, not one variant's total.
        let mut round_ratios = Vec::with_capacity(rounds);
        // Warm the connection pools.
        drive(client.clone(), &base, concurrency * 4, concurrency).await;
        drive(stack.clone(), &base, concurrency * 4, concurrency).await;
        for round in 0..rounds {
            // The order alternates too, so neither variant always runs first.
            let mut times = [Duration::ZERO; 2];
            for variant in [round % 2, 1 - round % 2] {
                if variant == 0 {
                    let r = drive(client.clone(), &base, requests / rounds, concurrency).await;
                    times[0] = r.elapsed;
                    bare.extend(r.latencies);
                } else {
                    let r = drive(stack.clone(), &base, requests / rounds, concurrency).await;
                    times[1] = r.elapsed;
                    with.extend(r.latencies);
                }
            }
            bare_time += times[0];
            with_time += times[1];
            round_ratios.push(times[0].as_secs_f64() / times[1].as_secs_f64());
        }
        round_ratios.sort_by(f64::total_cmp);
        bare.sort_unstable();
        with.sort_unstable();
        let rps = |n: usize, t: Duration| n as f64 / t.as_secs_f64();
        let (bare_rps, with_rps) = (rps(bare.len(), bare_time), rps(with.len(), with_time));
        println!("loopback, {} requests per variant, concurrency {concurrency}, {rounds} alternating rounds", bare.len());
        println!("{:<22} {:>12} {:>10} {:>10} {:>10}", "variant", "req/s", "p50 µs", "p99 µs", "max µs");
        for (name, r, lat) in [("hyper-util client", bare_rps, &bare), ("client + Backstop", with_rps, &with)] {
            println!(
                "{name:<22} {r:>12.0} {:>10.0} {:>10.0} {:>10.0}",
                percentile(lat, 0.5).as_secs_f64() * 1e6,
                percentile(lat, 0.99).as_secs_f64() * 1e6,
                lat[lat.len() - 1].as_secs_f64() * 1e6
            );
        }
        println!("throughput with the stack: {:.1} % of without (all rounds together)", with_rps / bare_rps * 100.0);
        println!(
            "per-round ratios: median {:.1} %, range {:.1} – {:.1} % ({rounds} rounds)",
            round_ratios[round_ratios.len() / 2] * 100.0,
            round_ratios[0] * 100.0,
            round_ratios[round_ratios.len() - 1] * 100.0
        );
        server.shutdown().await;
    });
}
