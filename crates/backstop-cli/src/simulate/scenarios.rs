//! The embedded default scenarios, and the scenario file format.

use std::time::Duration;

use backstop_mock::{Capacity, Fault, Latency, ModelPlan, Scenario as MockScenario};
use serde::Deserialize;

/// The primary model every simulated client asks for.
pub const PRIMARY: &str = "gpt-4o";
/// The fallback model, in scenarios that have one.
pub const FALLBACK: &str = "claude-sonnet";

/// One simulation scenario: the offered load, and how the mock provider behaves.
#[derive(Clone, Debug)]
pub struct SimScenario {
    /// Short name (`transient`, `primary-outage`, …).
    pub name: String,
    /// What it models, in one sentence.
    pub description: String,
    /// How long clients keep offering load.
    pub duration: Duration,
    /// Logical requests per second, Poisson arrivals.
    pub rate_per_s: f64,
    /// Whether clients may fall back to [`FALLBACK`].
    pub has_fallback: bool,
    /// The outage window, when the scenario has one (for recovery time).
    pub outage: Option<(Duration, Duration)>,
    /// The mock provider's behaviour.
    pub provider: MockScenario,
}

fn healthy_latency() -> Latency {
    Latency::log_normal(Duration::from_millis(800), 0.4, Duration::from_secs(10))
}

fn healthy() -> ModelPlan {
    ModelPlan::ok().latency(healthy_latency())
}

/// The six embedded scenarios, in the order `backstop simulate` runs them.
pub fn defaults(seed: u64) -> Vec<SimScenario> {
    vec![
        SimScenario {
            name: "transient".into(),
            description: "30 % of primary attempts fail with a 5xx at random; a healthy fallback exists.".into(),
            duration: Duration::from_secs(60),
            rate_per_s: 50.0,
            has_fallback: true,
            outage: None,
            provider: MockScenario::new(seed)
                .model(PRIMARY, healthy().with_random(0.3, Fault::OpenAiServerError))
                .model(FALLBACK, healthy()),
        },
        // The outage the latency target has in mind: a provider shedding load
        // with 429s, which the tenacity pattern retries and waits out (up to 12 HTTP
        // attempts per model) before it falls back.
        SimScenario {
            name: "primary-outage".into(),
            description: "The primary answers every request with a 429 rate_limit_exceeded and Retry-After: 1 from 10 s to 70 s (a provider shedding load); the fallback model is healthy.".into(),
            duration: Duration::from_secs(90),
            rate_per_s: 50.0,
            has_fallback: true,
            outage: Some((Duration::from_secs(10), Duration::from_secs(70))),
            provider: MockScenario::new(seed)
                .model(
                    PRIMARY,
                    healthy().outage(
                        Duration::from_secs(10),
                        Duration::from_secs(70),
                        Fault::OpenAiRateLimit {
                            retry_after: Some("1".into()),
                            retry_after_ms: None,
                        },
                    ),
                )
                .model(FALLBACK, healthy()),
        },
        // The same outage answered with 503s, which the tenacity decorator does not
        // retry (only the SDK under it does, twice): it falls back after about 1.5 s.
        SimScenario {
            name: "primary-outage-503".into(),
            description: "The primary answers 503 from 10 s to 70 s; the fallback model is healthy.".into(),
            duration: Duration::from_secs(90),
            rate_per_s: 50.0,
            has_fallback: true,
            outage: Some((Duration::from_secs(10), Duration::from_secs(70))),
            provider: MockScenario::new(seed)
                .model(
                    PRIMARY,
                    healthy().outage(Duration::from_secs(10), Duration::from_secs(70), Fault::OpenAiOverloaded),
                )
                .model(FALLBACK, healthy()),
        },
        SimScenario {
            name: "full-outage".into(),
            description: "Every attempt fails with a 500 and there is no fallback.".into(),
            duration: Duration::from_secs(60),
            rate_per_s: 50.0,
            has_fallback: false,
            outage: None,
            provider: MockScenario::new(seed).model(PRIMARY, ModelPlan::always(Fault::OpenAiServerError)),
        },
        SimScenario {
            name: "rate-limited".into(),
            description: "A 40 requests/s quota answered with 429 + Retry-After: 1 beyond it, under 50 requests/s of offered load.".into(),
            duration: Duration::from_secs(60),
            rate_per_s: 50.0,
            has_fallback: false,
            outage: None,
            provider: MockScenario::new(seed).model(
                PRIMARY,
                healthy().capacity(Capacity::per_second(40).over(Fault::OpenAiRateLimit {
                    retry_after: Some("1".into()),
                    retry_after_ms: None,
                })),
            ),
        },
        SimScenario {
            name: "overload".into(),
            description: "A provider with capacity for 50 requests in flight at 90 % load, through a 10 s outage (20 s to 30 s): does it return to health?".into(),
            duration: Duration::from_secs(60),
            // 50 in flight at ~0.8 s each is ~62 req/s of capacity; 90 % of it.
            rate_per_s: 56.0,
            has_fallback: false,
            outage: Some((Duration::from_secs(20), Duration::from_secs(30))),
            provider: MockScenario::new(seed).model(
                PRIMARY,
                healthy()
                    .capacity(Capacity::in_flight(50).over(Fault::OpenAiOverloaded))
                    .outage(Duration::from_secs(20), Duration::from_secs(30), Fault::OpenAiOverloaded),
            ),
        },
    ]
}

/// The longest `duration` a scenario file may give: a day of simulated time (the
/// embedded scenarios run for at most 90 s). The report holds a timeline point per
/// simulated second.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The most requests a scenario file may plan (`duration` × `rate_per_s`): a
/// million, some two hundred times the largest embedded scenario (90 s at 50 per
/// second). Each is a task the run keeps until it finishes.
pub const MAX_PLANNED_REQUESTS: u64 = 1_000_000;

/// A scenario file (`--scenario FILE`, TOML): the load, plus a mock-provider scenario in
/// `backstop-mock`'s own format under `[provider]`. `duration` is at most
/// [`MAX_DURATION`], `rate_per_s` in (0, 100000], and together they plan at most
/// [`MAX_PLANNED_REQUESTS`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Short name.
    pub name: String,
    /// One sentence.
    #[serde(default)]
    pub description: String,
    /// How long clients offer load, e.g. `"60s"`.
    #[serde(with = "humantime_serde_compat")]
    pub duration: Duration,
    /// Logical requests per second.
    pub rate_per_s: f64,
    /// Whether clients may fall back to the second model.
    #[serde(default)]
    pub has_fallback: bool,
    /// Outage window `[from, until]`, e.g. `["10s", "70s"]`, for the recovery metric.
    #[serde(default)]
    pub outage: Option<[String; 2]>,
    /// The mock provider's scenario (models `gpt-4o` and `claude-sonnet`).
    pub provider: toml::Value,
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Errors reading a scenario file.
#[derive(Debug)]
pub enum ScenarioFileError {
    /// The file could not be read.
    Read(std::io::Error),
    /// It is not a valid scenario file.
    Parse(String),
}

impl std::fmt::Display for ScenarioFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScenarioFileError::Read(e) => write!(f, "cannot read the scenario file: {e}"),
            ScenarioFileError::Parse(e) => write!(f, "invalid scenario file: {e}"),
        }
    }
}

impl std::error::Error for ScenarioFileError {}

/// Parses a scenario file's text.
pub fn from_toml(text: &str, seed: u64) -> Result<SimScenario, ScenarioFileError> {
    let file: ScenarioFile =
        toml::from_str(text).map_err(|e| ScenarioFileError::Parse(e.to_string()))?;
    let provider_text =
        toml::to_string(&file.provider).map_err(|e| ScenarioFileError::Parse(e.to_string()))?;
    let mut provider = MockScenario::from_toml_str(&provider_text)
        .map_err(|e| ScenarioFileError::Parse(format!("[provider]: {e}")))?;
    provider.seed = seed;
    let outage = match file.outage {
        None => None,
        Some([from, until]) => {
            let parse = |s: &str| {
                humantime::parse_duration(s)
                    .map_err(|e| ScenarioFileError::Parse(format!("outage: {e}")))
            };
            Some((parse(&from)?, parse(&until)?))
        }
    };
    if !(file.rate_per_s > 0.0 && file.rate_per_s.is_finite() && file.rate_per_s <= 100_000.0) {
        return Err(ScenarioFileError::Parse(
            "rate_per_s must be in (0, 100000]".into(),
        ));
    }
    // The run holds a point per simulated second and a task per planned request:
    // both must fit in memory (a duration of "18446744073709551615s" would not).
    if file.duration > MAX_DURATION {
        return Err(ScenarioFileError::Parse(format!(
            "duration {} is over the longest a simulation runs, {}",
            humantime::format_duration(file.duration),
            humantime::format_duration(MAX_DURATION),
        )));
    }
    let planned = file.duration.as_secs_f64() * file.rate_per_s;
    if planned > MAX_PLANNED_REQUESTS as f64 {
        return Err(ScenarioFileError::Parse(format!(
            "duration {} at rate_per_s {} plans {planned:.0} requests, over the most a \
             simulation runs, {MAX_PLANNED_REQUESTS}; shorten duration or lower rate_per_s",
            humantime::format_duration(file.duration),
            file.rate_per_s,
        )));
    }
    Ok(SimScenario {
        name: file.name,
        description: file.description,
        duration: file.duration,
        rate_per_s: file.rate_per_s,
        has_fallback: file.has_fallback,
        outage,
        provider,
    })
}
