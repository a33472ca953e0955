//! Pools and their deployments: a pool is the model name clients send; each
//! of its deployments is one upstream (a provider, a base URL, a key, an
//! upstream model name and its rate limits) that can serve it.

use serde::Deserialize;

use super::ConfigError;
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI's API or any compatible server (Azure OpenAI style gateways,
    /// vLLM, Ollama, the mock provider).
    #[default]
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// One upstream that can serve a pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// Name in metrics and logs; `<pool>-<n>` (from 1) unless set.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub provider: ProviderKind,
    /// Base URL up to and including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Model name sent upstream; defaults to the pool name.
    #[serde(default)]
    pub model: Option<String>,
    /// The upstream API key itself (prefer `api_key_env` or `api_key_file`).
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Name of an environment variable holding the upstream API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the upstream API key (a mounted secret); surrounding
    /// whitespace is trimmed.
    #[serde(default)]
    pub api_key_file: Option<String>,
    /// Requests per minute this deployment allows, shared by all workers; 0 = no limit.
    #[serde(default)]
    pub rpm: u64,
    /// Tokens per minute this deployment allows, shared by all workers; 0 = no limit.
    #[serde(default)]
    pub tpm: u64,
    /// Calls in flight at once from one worker; 0 = no limit.
    #[serde(default)]
    pub max_concurrency: usize,
    /// Share of the pool's traffic relative to its other deployments.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl DeploymentConfig {
    /// A deployment of an OpenAI-compatible server with no key, no limits
    /// and weight 1; set the rest on the value.
    pub fn new(name: &str, base_url: &str) -> Self {
        Self {
            name: name.to_owned(),
            provider: ProviderKind::Openai,
            base_url: base_url.to_owned(),
            model: None,
            api_key: None,
            api_key_env: None,
            api_key_file: None,
            rpm: 0,
            tpm: 0,
            max_concurrency: 0,
            weight: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The model name clients send.
    pub name: String,
    /// The pool's deployments. A pool with a single upstream may instead set
    /// that upstream's fields (`provider`, `base_url`, `model`, `api_key*`,
    /// `rpm`, `tpm`, `max_concurrency`) on the pool itself.
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
    #[serde(default)]
    pub provider: ProviderKind,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub api_key_file: Option<String>,
    #[serde(default)]
    pub rpm: u64,
    #[serde(default)]
    pub tpm: u64,
    #[serde(default)]
    pub max_concurrency: usize,
    /// Most output tokens a request may ask for (`max_tokens`,
    /// `max_completion_tokens`); more is refused with 400 before it is
    /// queued, so no request can charge a token budget beyond reason.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u64,
}

/// The default of `pools.max_output_tokens`: above the largest output any
/// OpenAI or Anthropic model offers today (128K).
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 131_072;
/// The largest `pools.max_output_tokens` the config accepts: token
/// arithmetic stays far from overflowing with it.
pub const MAX_OUTPUT_TOKENS_LIMIT: u64 = 1 << 32;

fn default_max_output_tokens() -> u64 {
    DEFAULT_MAX_OUTPUT_TOKENS
}

impl PoolConfig {
    /// A pool with one deployment, as set on the pool itself.
    pub fn single(name: &str, base_url: &str) -> Self {
        Self {
            name: name.to_owned(),
            deployments: Vec::new(),
            provider: ProviderKind::Openai,
            base_url: Some(base_url.to_owned()),
            model: None,
            api_key: None,
            api_key_env: None,
            api_key_file: None,
            rpm: 0,
            tpm: 0,
            max_concurrency: 0,
            max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
        }
    }

    /// The deployments, named, with the pool-level shorthand turned into one.
    pub fn deployments(&self) -> Vec<DeploymentConfig> {
        let mut out = if self.deployments.is_empty() {
            vec![DeploymentConfig {
                name: String::new(),
                provider: self.provider,
                base_url: self.base_url.clone().unwrap_or_default(),
                model: self.model.clone(),
                api_key: self.api_key.clone(),
                api_key_env: self.api_key_env.clone(),
                api_key_file: self.api_key_file.clone(),
                rpm: self.rpm,
                tpm: self.tpm,
                max_concurrency: self.max_concurrency,
                weight: 1,
            }]
        } else {
            self.deployments.clone()
        };
        for (i, d) in out.iter_mut().enumerate() {
            if d.name.is_empty() {
                d.name = format!("{}-{}", self.name, i + 1);
            }
            if d.model.is_none() {
                d.model = Some(self.name.clone());
            }
        }
        out
    }

    /// Subject token for this pool: NATS tokens may not hold `.`, `*`, `>`
    /// or whitespace, which model names such as `gpt-4.1` do.
    pub fn subject_token(&self) -> String {
        crate::wire::subjects::token(&self.name)
    }

    pub(super) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let shorthand = self.base_url.is_some()
            || self.model.is_some()
            || self.api_key.is_some()
            || self.api_key_env.is_some()
            || self.api_key_file.is_some()
            || self.rpm > 0
            || self.tpm > 0
            || self.max_concurrency > 0;
        if !(1..=MAX_OUTPUT_TOKENS_LIMIT).contains(&self.max_output_tokens) {
            return Err(ConfigError::key(
                format!("pools[{i}].max_output_tokens"),
                format!("must be between 1 and {MAX_OUTPUT_TOKENS_LIMIT}"),
            ));
        }
        if self.deployments.is_empty() && self.base_url.is_none() {
            return Err(ConfigError::key(format!("pools[{i}]"), "set base_url or at least one [[pools.deployments]]"));
        }
        if !self.deployments.is_empty() && shorthand {
            return Err(ConfigError::key(
                format!("pools[{i}]"),
                "a pool with [[pools.deployments]] sets upstream fields on each deployment, not on the pool",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (j, d) in self.deployments().iter().enumerate() {
            let key = |field: &str| {
                if self.deployments.is_empty() {
                    format!("pools[{i}].{field}")
                } else {
                    format!("pools[{i}].deployments[{j}].{field}")
                }
            };
            if !(d.base_url.starts_with("http://") || d.base_url.starts_with("https://")) {
                return Err(ConfigError::key(key("base_url"), "must start with http:// or https://"));
            }
            let keys = [d.api_key.is_some(), d.api_key_env.is_some(), d.api_key_file.is_some()];
            if keys.iter().filter(|k| **k).count() > 1 {
                return Err(ConfigError::key(key("api_key"), "set one of api_key, api_key_env, api_key_file"));
            }
            if d.weight == 0 || d.weight > 1000 {
                return Err(ConfigError::key(key("weight"), "must be 1 to 1000"));
            }
            if !names.insert(crate::wire::subjects::token(&d.name)) {
                return Err(ConfigError::key(key("name"), "collides with another deployment's name"));
            }
        }
        Ok(())
    }
}
