//! Durations in scenarios are written the way people write them: `"250ms"`, `"2s"`,
//! `"1m 30s"` (humantime's format).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// `#[serde(with = "human_duration")]` for a `Duration`.
pub(crate) fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*value))
}

/// `#[serde(with = "human_duration")]` for a `Duration`.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({e}); write it like \"250ms\", \"2s\" or \"1m 30s\""
        ))
    })
}
