//! Provider profiles: which provider's conventions a [`Rules`](crate::Rules) applies.

/// Which provider's conventions to apply.
///
/// Every profile understands every provider's error envelope, because
/// OpenAI-compatible gateways pass other providers' bodies through unchanged. A
/// profile only switches on the few rules that are safe for its provider alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Profile {
    /// Any OpenAI-compatible server (vLLM, llama.cpp, Ollama, gateways): the default.
    #[default]
    Generic,
    /// OpenAI's API.
    OpenAi,
    /// Azure OpenAI: also reads "retry after N seconds" from the error message when
    /// no header gives a retry instruction.
    Azure,
    /// Anthropic, native Messages API or its OpenAI-compatible endpoint.
    Anthropic,
    /// Google Gemini's OpenAI-compatible endpoint.
    Gemini,
}

impl Profile {
    /// Every profile, for configuration help texts and tests.
    pub const ALL: [Profile; 5] = [
        Profile::Generic,
        Profile::OpenAi,
        Profile::Azure,
        Profile::Anthropic,
        Profile::Gemini,
    ];

    /// The profile's name in configuration files: `generic`, `openai`, `azure`,
    /// `anthropic`, `gemini`.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Generic => "generic",
            Profile::OpenAi => "openai",
            Profile::Azure => "azure",
            Profile::Anthropic => "anthropic",
            Profile::Gemini => "gemini",
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A profile name that is not one of [`Profile::ALL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownProfile(pub String);

impl std::fmt::Display for UnknownProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown provider profile `{}`; use one of generic, openai, azure, anthropic, gemini",
            self.0
        )
    }
}

impl std::error::Error for UnknownProfile {}

impl std::str::FromStr for Profile {
    type Err = UnknownProfile;

    /// Parses a profile name, ASCII case-insensitively.
    fn from_str(name: &str) -> Result<Self, UnknownProfile> {
        Profile::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| UnknownProfile(name.to_owned()))
    }
}
