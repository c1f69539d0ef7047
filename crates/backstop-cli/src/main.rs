//! `backstop`: simulate resilience policies in virtual time (the main job), run the
//! sidecar proxy, serve the mock provider.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use backstop_cli::simulate::{self, RunReport, SCHEMA_VERSION};

#[derive(Parser)]
#[command(
    name = "backstop",
    version,
    about = "Backstop: resilient calls to LLM APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios in virtual time against the in-memory mock provider and compare
    /// retry policies side by side (no file needed: six scenarios are embedded).
    Simulate {
        /// A scenario file (TOML) to run instead of the embedded defaults.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// The seed for arrivals, faults and jitter.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Print the report as JSON (stable schema, see `backstop_cli::simulate::report`).
        #[arg(long)]
        json: bool,
        /// Write an SVG of offered vs upstream load over time for each scenario
        /// (one file per scenario: FILE with the scenario name inserted before `.svg`).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Serve the fault-injecting mock provider (OpenAI-compatible, HTTP/1.1 and h2c) on a
    /// loopback address, for your own tests. Stops on Ctrl-C.
    Mock {
        /// A mock scenario file (TOML or JSON, `backstop-mock`'s format). Without one,
        /// every model answers with a normal completion.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: std::net::SocketAddr,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run the OpenAI-compatible sidecar: every request goes through the Backstop stack
    /// to the upstreams the configuration names. Without --config it fronts the
    /// built-in mock provider (gpt-4o falling back to claude-sonnet). Logs go to stderr
    /// (level from BACKSTOP_LOG: error, warn, info, debug, trace). Stops on Ctrl-C or
    /// SIGTERM, draining in-flight requests.
    Proxy {
        /// The stack's configuration file (TOML; `[models.NAME]` are the served models).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// How long shutdown waits for in-flight requests (e.g. `30s`).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: std::time::Duration,
        /// Extra root certificates (PEM) to trust besides the system's, for upstreams
        /// behind a private CA.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[command(flatten)]
        limits: ProxyLimits,
    },
}

/// The proxy's bounds on what clients may hold (see `ProxyConfig`'s setters).
#[derive(clap::Args, Debug)]
struct ProxyLimits {
    /// Chat requests in flight at once (a stream until its last byte); beyond it a
    /// request is answered at once with a 503 `proxy_overloaded` and `Retry-After: 1`.
    #[arg(long, default_value_t = backstop_cli::proxy::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Client connections open at once; beyond it a new one gets an immediate 503
    /// `proxy_connection_limit` and is closed.
    #[arg(long, default_value_t = backstop_cli::proxy::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Time a client has to send each HTTP/1.1 request head (and an idle keep-alive
    /// connection, or an HTTP/2 connection with no open stream, stays open), e.g. `30s`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    header_read_timeout: std::time::Duration,
    /// Time one write to a client may wait (the client taking no bytes of its
    /// response) before its connection is closed and the upstream request
    /// cancelled, e.g. `60s`; restarts at every write that completes.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    write_timeout: std::time::Duration,
    /// Time a client has to send a request body before a 408, e.g. `60s`.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    body_read_timeout: std::time::Duration,
    /// Bytes in a request head (HTTP/1.1: 431 beyond it) or header list (HTTP/2).
    #[arg(long, default_value_t = backstop_cli::proxy::DEFAULT_MAX_HEADER_BYTES)]
    max_header_bytes: usize,
    /// Streams open at once on one HTTP/2 connection.
    #[arg(long, default_value_t = backstop_cli::proxy::DEFAULT_MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: u32,
    /// Request-body bytes all chat requests hold at once (never less than the
    /// per-request cap); a request with no room gets a 503 `proxy_body_budget` and
    /// `Retry-After: 1`.
    #[arg(long, default_value_t = backstop_cli::proxy::DEFAULT_MAX_BUFFERED_BODY_BYTES)]
    max_buffered_body_bytes: usize,
}

impl ProxyLimits {
    fn apply(&self, config: backstop_cli::proxy::ProxyConfig) -> backstop_cli::proxy::ProxyConfig {
        config
            .max_in_flight(self.max_in_flight)
            .max_connections(self.max_connections)
            .header_read_timeout(self.header_read_timeout)
            .write_timeout(self.write_timeout)
            .body_read_timeout(self.body_read_timeout)
            .max_header_bytes(self.max_header_bytes)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_buffered_body_bytes(self.max_buffered_body_bytes)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate {
            scenario,
            seed,
            json,
            plot,
        } => match run_simulate(scenario, seed, json, plot) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("backstop simulate: {message}");
                ExitCode::FAILURE
            }
        },
        Command::Mock {
            scenario,
            listen,
            seed,
        } => match run_mock(scenario, listen, seed) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("backstop mock: {message}");
                ExitCode::FAILURE
            }
        },
        Command::Proxy {
            config,
            listen,
            drain_timeout,
            ca_file,
            limits,
        } => match run_proxy(config, listen, drain_timeout, ca_file, limits) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("backstop proxy: {message}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_proxy(
    config: Option<PathBuf>,
    listen: std::net::SocketAddr,
    drain_timeout: std::time::Duration,
    ca_file: Option<PathBuf>,
    limits: ProxyLimits,
) -> Result<(), String> {
    let level = match std::env::var("BACKSTOP_LOG").ok().as_deref() {
        None | Some("") => tracing::Level::INFO,
        Some(text) => text.parse::<tracing::Level>().map_err(|_| {
            format!("BACKSTOP_LOG={text:?}: expected error, warn, info, debug or trace")
        })?,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    let roots = match &ca_file {
        None => Vec::new(),
        Some(path) => {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
        }
    };
    let config = match config {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Some(
                backstop_cli::proxy::ProxyConfig::from_toml_str(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .drain_timeout(drain_timeout)
                    .with_root_certificates_pem(roots),
            )
            .map(|config| limits.apply(config))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let handle = match config {
            Some(config) => backstop_cli::proxy::serve(config, listener).await,
            None => {
                backstop_cli::proxy::serve_builtin_mock_with(
                    backstop_mock::Scenario::new(0),
                    listener,
                    |config| limits.apply(config.drain_timeout(drain_timeout)),
                )
                .await
            }
        }
        .map_err(|e| e.to_string())?;
        if let Some(mock) = handle.mock() {
            eprintln!(
                "no --config: serving gpt-4o (falling back to claude-sonnet) from the built-in mock provider at {}",
                mock.base_url()
            );
        }
        eprintln!("backstop proxy listening: OPENAI_BASE_URL={}", handle.base_url());
        shutdown_signal().await?;
        eprintln!("shutting down: draining in-flight requests (up to {})", humantime::format_duration(drain_timeout));
        handle.shutdown().await;
        Ok(())
    })
}

/// Ctrl-C, or SIGTERM (what container runtimes send) where there is one.
async fn shutdown_signal() -> Result<(), String> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot wait for SIGTERM: {e}"))?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map_err(|e| format!("cannot wait for Ctrl-C: {e}")),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))
    }
}

fn run_mock(
    scenario: Option<PathBuf>,
    listen: std::net::SocketAddr,
    seed: Option<u64>,
) -> Result<(), String> {
    let mut scenario = match scenario {
        None => backstop_mock::Scenario::new(0),
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let parsed = if path.extension().is_some_and(|e| e == "json") {
                backstop_mock::Scenario::from_json_str(&text)
            } else {
                backstop_mock::Scenario::from_toml_str(&text)
            };
            parsed.map_err(|e| format!("{}: {e}", path.display()))?
        }
    };
    if let Some(seed) = seed {
        scenario.seed = seed;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let server = backstop_mock::MockServer::start(scenario, listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        eprintln!(
            "mock provider listening: OPENAI_BASE_URL={}",
            server.base_url()
        );
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))?;
        eprintln!(
            "shutting down; {} attempts served",
            server.provider().attempt_count()
        );
        server.shutdown().await;
        Ok(())
    })
}

fn run_simulate(
    scenario: Option<PathBuf>,
    seed: u64,
    json: bool,
    plot: Option<PathBuf>,
) -> Result<(), String> {
    let scenarios = match scenario {
        None => simulate::scenarios::defaults(seed),
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            vec![
                simulate::scenarios::from_toml(&text, seed)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            ]
        }
    };
    let total = (scenarios.len() * simulate::Policy::ALL.len()) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut report = RunReport {
        schema_version: SCHEMA_VERSION,
        seed,
        scenarios: Vec::new(),
    };
    for s in &scenarios {
        let r = simulate::run_scenario(s, seed, |policy| {
            bar.set_message(format!("{} / {policy}", s.name));
            bar.inc(1);
        });
        if let Some(path) = &plot {
            let file = plot_path(path, &r.name, scenarios.len() > 1);
            std::fs::write(&file, simulate::plot::render_svg(&r))
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        }
        report.scenarios.push(r);
    }
    bar.finish_and_clear();
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        println!(
            "Backstop simulation, seed {seed}: every policy against the same offered load and faults."
        );
        for s in &report.scenarios {
            print!("{}", simulate::render_table(s));
        }
    }
    Ok(())
}

fn plot_path(path: &std::path::Path, scenario: &str, many: bool) -> PathBuf {
    if !many {
        return path.to_path_buf();
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plot");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("svg");
    path.with_file_name(format!("{stem}-{scenario}.{ext}"))
}
