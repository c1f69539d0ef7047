//! A bounded load test of `backstop proxy`: the proxy in-process, in front of the
//! built-in mock provider (instant answers by default), driven over loopback at a
//! fixed concurrency for a fixed time or number of requests. It samples the
//! process's resident memory (`VmRSS` in `/proc/self/status`, Linux) as it goes and
//! prints throughput, latency percentiles, how many requests were shed (503
//! `proxy_overloaded`) and the RSS over time, so one can see whether memory stays
//! flat over a long run.
//!
//! ```text
//! # 3 minutes at 64 concurrent requests (release build: the figures mean little in debug)
//! cargo run --release -p backstop-cli --example proxy_load -- --duration 180s --concurrency 64
//!
//! # Overload: 512 callers, a 20 ms provider, at most 128 requests in flight
//! cargo run --release -p backstop-cli --example proxy_load -- \
//!     --duration 60s --concurrency 512 --max-in-flight 128 --mock-latency 20ms
//!
//! # SSE streams (5 events each), over h2c
//! cargo run --release -p backstop-cli --example proxy_load -- --duration 60s --stream --http2
//! ```
//!
//! The harness itself keeps bounded memory: latencies go into a fixed log-linear
//! histogram (16 buckets per power of two, so percentiles are within 6 %), the mock
//! keeps only its latest 1 024 attempt records, and the RSS samples are one per
//! `--sample-every`. The client and the mock live in the same process as the
//! proxy, so the RSS is theirs too: an upper bound on the proxy's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backstop::mock::{Latency, ModelPlan, Scenario};
use backstop_cli::proxy;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// Drive the proxy at a fixed concurrency and report throughput, latency, shedding
/// and memory.
#[derive(Parser, Debug)]
struct Args {
    /// Requests in flight at once from the load generator.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests, if that comes before the duration.
    #[arg(long)]
    requests: Option<u64>,
    /// The proxy's in-flight bound (`--max-in-flight` of `backstop proxy`).
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// The proxy's connection bound (`--max-connections` of `backstop proxy`).
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// How long the mock provider takes to answer (0 = instantly).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    mock_latency: Duration,
    /// Ask for SSE streams (5 events) instead of JSON completions.
    #[arg(long)]
    stream: bool,
    /// Speak h2c (HTTP/2 with prior knowledge) to the proxy, on one connection
    /// per 100 callers; HTTP/1.1 (a connection per caller) otherwise.
    #[arg(long)]
    http2: bool,
    /// How often to sample and print RSS and throughput.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample_every: Duration,
}

/// Counts per outcome, shared by the callers.
#[derive(Default)]
struct Tally {
    issued: AtomicU64,
    ok: AtomicU64,
    shed: AtomicU64,
    other_status: AtomicU64,
    transport_errors: AtomicU64,
}

impl Tally {
    fn done(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
            + self.shed.load(Ordering::Relaxed)
            + self.other_status.load(Ordering::Relaxed)
            + self.transport_errors.load(Ordering::Relaxed)
    }
}

/// Latencies in microseconds, in fixed log-linear buckets: 16 per power of two.
struct Histogram {
    buckets: Vec<u64>,
    max: u64,
}

const SUB_BUCKETS: u32 = 16;

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: vec![0; (64 * SUB_BUCKETS) as usize],
            max: 0,
        }
    }

    fn index(micros: u64) -> usize {
        let v = micros.max(1);
        let power = 63 - v.leading_zeros();
        // The four bits after the leading one choose the sub-bucket.
        let sub = if power >= 4 {
            (v >> (power - 4)) & 0xf
        } else {
            (v << (4 - power)) & 0xf
        };
        (power * SUB_BUCKETS) as usize + sub as usize
    }

    /// The upper edge of bucket `index`, in microseconds.
    fn upper(index: usize) -> u64 {
        let power = index as u32 / SUB_BUCKETS;
        let sub = index as u64 % SUB_BUCKETS as u64;
        let base = 1u64 << power;
        base + (base * (sub + 1)) / SUB_BUCKETS as u64
    }

    fn record(&mut self, micros: u64) {
        self.buckets[Self::index(micros)] += 1;
        self.max = self.max.max(micros);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.max = self.max.max(other.max);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn percentile(&self, p: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

/// The process's resident set size in KiB, from `/proc/self/status`.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn ms(micros: u64) -> String {
    format!("{:.3} ms", micros as f64 / 1000.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let rss_before = rss_kib();
    let mut plan = ModelPlan::ok().stream_chunks(5);
    if !args.mock_latency.is_zero() {
        plan = plan.latency(Latency::fixed(args.mock_latency));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (max_in_flight, max_connections) = (args.max_in_flight, args.max_connections);
    let handle = proxy::serve_builtin_mock_with(
        Scenario::new(0).model("gpt-4o", plan),
        listener,
        move |config| {
            config
                .max_in_flight(max_in_flight)
                .max_connections(max_connections)
                .drain_timeout(Duration::from_secs(5))
        },
    )
    .await?;
    if let Some(mock) = handle.mock() {
        // The mock's detailed records would otherwise grow to 100 000 entries and
        // show up as growth that is not the proxy's.
        mock.provider().set_record_limit(1024);
    }
    let url = format!("{}/chat/completions", handle.base_url());
    let body = Bytes::from(format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hello"}}],"stream":{}}}"#,
        args.stream
    ));
    println!(
        "proxy_load: {} callers, {} for at most {}{}, max_in_flight {}, max_connections {}, mock latency {:?}, {} over {}",
        args.concurrency,
        if args.stream {
            "SSE streams"
        } else {
            "JSON completions"
        },
        humantime::format_duration(args.duration),
        args.requests
            .map_or_else(String::new, |n| format!(" or {n} requests")),
        args.max_in_flight,
        args.max_connections,
        args.mock_latency,
        url,
        if args.http2 { "h2c" } else { "HTTP/1.1" },
    );
    println!("RSS before load: {}", mib(rss_before));

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let stop_at = started + args.duration;
    let limit = args.requests.unwrap_or(u64::MAX);
    let h2_clients: Vec<Client<_, Full<Bytes>>> = (0..args.concurrency.div_ceil(100))
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http()
        })
        .collect();
    let h1_client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build_http();
    let mut callers = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        let client = if args.http2 {
            h2_clients[i % h2_clients.len()].clone()
        } else {
            h1_client.clone()
        };
        let tally = tally.clone();
        let url = url.clone();
        let body = body.clone();
        callers.push(tokio::spawn(async move {
            let mut histogram = Histogram::new();
            while Instant::now() < stop_at && tally.issued.fetch_add(1, Ordering::Relaxed) < limit {
                let request = http::Request::post(url.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("a valid request");
                let sent = Instant::now();
                let outcome = match client.request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        match response.into_body().collect().await {
                            Ok(_) if status == 200 => &tally.ok,
                            Ok(_) if status == 503 => &tally.shed,
                            Ok(_) => &tally.other_status,
                            Err(_) => &tally.transport_errors,
                        }
                    }
                    Err(_) => &tally.transport_errors,
                };
                outcome.fetch_add(1, Ordering::Relaxed);
                histogram.record(sent.elapsed().as_micros() as u64);
            }
            histogram
        }));
    }

    // Sample until every caller stopped.
    let mut samples: Vec<(Duration, u64, Option<u64>)> = Vec::new();
    let mut last_done = 0;
    let mut ticker = tokio::time::interval_at(started + args.sample_every, args.sample_every);
    while callers.iter().any(|c| !c.is_finished()) {
        tokio::select! {
            _ = ticker.tick() => {
                let done = tally.done();
                let rss = rss_kib();
                let elapsed = started.elapsed();
                println!(
                    "t={:>6.1}s  requests={:>9}  rate={:>8.0}/s  shed={:>8}  errors={:>6}  RSS={}",
                    elapsed.as_secs_f64(),
                    done,
                    (done - last_done) as f64 / args.sample_every.as_secs_f64(),
                    tally.shed.load(Ordering::Relaxed),
                    tally.transport_errors.load(Ordering::Relaxed) + tally.other_status.load(Ordering::Relaxed),
                    mib(rss),
                );
                samples.push((elapsed, done, rss));
                last_done = done;
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let elapsed = started.elapsed();
    let mut histogram = Histogram::new();
    for caller in callers {
        histogram.merge(&caller.await?);
    }
    let rss_end = rss_kib();
    let done = tally.done();
    println!();
    println!(
        "done: {done} requests in {:.1}s = {:.0} requests/s",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64()
    );
    println!(
        "outcomes: 200 = {}, shed (503) = {}, other status = {}, transport errors = {}",
        tally.ok.load(Ordering::Relaxed),
        tally.shed.load(Ordering::Relaxed),
        tally.other_status.load(Ordering::Relaxed),
        tally.transport_errors.load(Ordering::Relaxed)
    );
    println!(
        "latency: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        ms(histogram.percentile(50.0)),
        ms(histogram.percentile(90.0)),
        ms(histogram.percentile(99.0)),
        ms(histogram.percentile(99.9)),
        ms(histogram.max)
    );
    let peak = samples.iter().filter_map(|s| s.2).max();
    let pick = |i: usize| samples.get(i).and_then(|s| s.2);
    println!(
        "RSS: before {}  first sample {}  middle {}  last sample {}  end {}  peak sampled {}",
        mib(rss_before),
        mib(pick(0)),
        mib(pick(samples.len() / 2)),
        mib(samples.len().checked_sub(1).and_then(pick)),
        mib(rss_end),
        mib(peak)
    );
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn percentiles_fall_within_one_sub_bucket() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        for (p, exact) in [(50.0, 5_000u64), (90.0, 9_000), (99.0, 9_900)] {
            let got = h.percentile(p);
            assert!(got >= exact && got <= exact + exact / 16 + 1, "p{p}: {got}");
        }
        assert_eq!(h.percentile(100.0), 10_000);
    }
}
