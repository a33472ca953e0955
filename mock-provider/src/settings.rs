//! What the mock does: fixed at start by flags, changed at run time by
//! `POST /_mock/faults` with a JSON object of the same fields.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Delay before every answer.
    pub latency_ms: u64,
    /// `usage.completion_tokens` of every answer (capped by `max_tokens`).
    pub completion_tokens: u32,
    /// Length of embedding vectors.
    pub embedding_dim: usize,
    #[serde(flatten)]
    pub faults: Faults,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Requests admitted in any 60-second window; past it 429 with `Retry-After`
    /// and the provider's rate-limit headers (on every answer). 0 is no limit.
    pub rpm: u64,
    /// Tokens admitted in any 60-second window (a request counts its body's
    /// length / 4 plus its `max_tokens` on arrival); 0 is no limit.
    pub tpm: u64,
    /// Share of requests answered with `error_status` (0.0 to 1.0).
    pub error_rate: f64,
    /// Share of requests that hang for `hang_ms` before any byte is sent.
    pub hang_rate: f64,
    /// The next N requests fail with `error_status`, then the mock recovers.
    pub fail_next: u64,
    /// The next N requests hang.
    pub hang_next: u64,
    /// Status of injected failures; 500 unless set.
    pub error_status: u16,
    /// How long a hang lasts; 10 minutes unless set.
    pub hang_ms: u64,
    /// Pause between the events of a streamed answer.
    pub stream_delay_ms: u64,
    /// `Retry-After` sent with injected failures, as written (any text, to
    /// try what a client does with absurd values).
    pub retry_after: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { latency_ms: 0, completion_tokens: 16, embedding_dim: 8, faults: Faults::default() }
    }
}

impl Settings {
    /// Reads `--latency-ms N`, `--completion-tokens N`, `--rpm N`, `--tpm N`,
    /// `--error-rate F`, `--hang-rate F` from command-line arguments.
    pub fn from_args(args: &[String]) -> Result<Self, String> {
        let mut s = Settings::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--listen" {
                it.next();
                continue;
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = || format!("{flag}: `{value}` is not a number");
            match flag.as_str() {
                "--latency-ms" => s.latency_ms = value.parse().map_err(|_| bad())?,
                "--completion-tokens" => s.completion_tokens = value.parse().map_err(|_| bad())?,
                "--rpm" => s.faults.rpm = value.parse().map_err(|_| bad())?,
                "--tpm" => s.faults.tpm = value.parse().map_err(|_| bad())?,
                "--error-rate" => s.faults.error_rate = value.parse().map_err(|_| bad())?,
                "--hang-rate" => s.faults.hang_rate = value.parse().map_err(|_| bad())?,
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(s)
    }
}
