//! A scenario: the seed and the plan of every model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ScenarioError;
use crate::plan::ModelPlan;
use crate::wire;

/// The whole behaviour of a mock provider: a seed, a plan per model, and the plan
/// for models not listed.
///
/// ```
/// use backstop_mock::{Fault, ModelPlan, Scenario};
/// let scenario = Scenario::new(42)
///     .model("gpt-4o", ModelPlan::script([Fault::OpenAiServerError]))
///     .default_plan(ModelPlan::always(Fault::OpenAiModelNotFound));
/// assert_eq!(scenario.models().count(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seed of every random choice (faults and latency).
    #[serde(default)]
    pub seed: u64,
    /// Plans of the listed models; also what `GET /v1/models` lists.
    #[serde(default)]
    pub models: BTreeMap<String, ModelPlan>,
    /// Plan for models not listed (default: always ok).
    #[serde(default, rename = "default")]
    pub default_plan: ModelPlan,
}

impl Scenario {
    /// An empty scenario: every model always answers ok.
    pub fn new(seed: u64) -> Self {
        Scenario {
            seed,
            models: BTreeMap::new(),
            default_plan: ModelPlan::ok(),
        }
    }

    /// Sets the plan of `name`.
    #[must_use]
    pub fn model(mut self, name: impl Into<String>, plan: ModelPlan) -> Self {
        self.models.insert(name.into(), plan);
        self
    }

    /// Sets the plan for models not listed.
    #[must_use]
    pub fn default_plan(mut self, plan: ModelPlan) -> Self {
        self.default_plan = plan;
        self
    }

    /// The listed model names, in name order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// The plan that serves `model`.
    pub fn plan_for(&self, model: &str) -> &ModelPlan {
        self.models.get(model).unwrap_or(&self.default_plan)
    }

    /// Reads a scenario from TOML and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario =
            toml::from_str(text).map_err(|e| ScenarioError::Toml(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Reads a scenario from JSON and validates it.
    pub fn from_json_str(text: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario =
            serde_json::from_str(text).map_err(|e| ScenarioError::Json(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Writes the scenario as JSON.
    pub fn to_json_string(&self) -> String {
        // Serializing plain data with string keys cannot fail; stay total anyway.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks that every fault can be sent as written and every number is sane.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let plans = self
            .models
            .iter()
            .map(|(name, plan)| (name.as_str(), plan))
            .chain(std::iter::once(("(default)", &self.default_plan)));
        for (model, plan) in plans {
            let invalid = |problem: String| ScenarioError::Invalid {
                model: model.to_owned(),
                problem,
            };
            for fault in plan.faults() {
                wire::validate(fault).map_err(invalid)?;
            }
            wire::validate_stream(plan.stream_chunks, plan.stream_pings).map_err(invalid)?;
            for random in &plan.random {
                if !(0.0..=1.0).contains(&random.probability) {
                    return Err(invalid(format!(
                        "probability {} is outside 0..=1",
                        random.probability
                    )));
                }
            }
            for outage in &plan.outages {
                if outage.until <= outage.from {
                    return Err(invalid(format!(
                        "outage ends ({:?}) before it starts ({:?})",
                        outage.until, outage.from
                    )));
                }
            }
            if let crate::plan::Latency::LogNormal { sigma, .. } = plan.latency
                && !(sigma.is_finite() && sigma >= 0.0)
            {
                return Err(invalid(format!(
                    "log-normal sigma {sigma} must be finite and >= 0"
                )));
            }
        }
        Ok(())
    }
}
