//! How one chat completion behaves, chosen by the request's model name, so
//! that one mock serves every profile a test or a benchmark needs (a pool
//! picks one with its deployment's `model`):
//!
//! `<name>@tokens=4000,tps=50,first_ms=300,pause_ms=20000,pause_every=100,bytes=20000000`
//!
//! | option | effect |
//! | --- | --- |
//! | `tokens=N` | the answer has N completion tokens (one word each) after the usual quote |
//! | `token_bytes=L` | each of those words is L bytes long (large stream chunks) |
//! | `tps=R` | tokens are produced at R per second: a non-streamed answer, headers included, is sent only once all are (as OpenAI and Anthropic do), a streamed one token by token |
//! | `first_ms=M` | the first token comes after M ms |
//! | `pause_ms=P`, `pause_every=K` | a stream pauses P ms after every K tokens (a reasoning model thinking) |
//! | `bytes=B` | a non-streamed answer whose content is B bytes (a very large answer), sent with its `Content-Length` as it is produced, without building it in memory |
//!
//! A model name without `@` behaves as before: a short answer at once.

use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub tokens: Option<u64>,
    pub tps: Option<f64>,
    pub first: Duration,
    pub pause: Duration,
    pub pause_every: u64,
    pub bytes: Option<u64>,
    pub token_bytes: Option<usize>,
}

/// Most tokens or bytes a profile may ask for (the mock must not be made to
/// allocate without bound).
const MAX_TOKENS: u64 = 1_000_000;
const MAX_BYTES: u64 = 1 << 30;

impl Profile {
    /// The profile in a model name; unknown options are ignored.
    pub fn of(model: &str) -> Self {
        let mut p = Profile::default();
        let Some((_, options)) = model.split_once('@') else { return p };
        for option in options.split([',', '@']) {
            let Some((key, value)) = option.split_once('=') else { continue };
            let n = value.parse::<u64>().ok();
            match key {
                "tokens" => p.tokens = n.map(|n| n.min(MAX_TOKENS)),
                "tps" => p.tps = value.parse::<f64>().ok().filter(|r| *r > 0.0),
                "first_ms" => p.first = Duration::from_millis(n.unwrap_or(0)),
                "pause_ms" => p.pause = Duration::from_millis(n.unwrap_or(0)),
                "pause_every" => p.pause_every = n.unwrap_or(0),
                "bytes" => p.bytes = n.map(|n| n.min(MAX_BYTES)),
                "token_bytes" => p.token_bytes = n.map(|n| n.clamp(1, 1 << 20) as usize),
                _ => {}
            }
        }
        p
    }

    /// The word each of the profile's tokens is.
    pub fn token(&self) -> String {
        self.token_bytes.map_or_else(|| "tok".to_owned(), |n| "t".repeat(n))
    }

    /// The pause before token `i` (0-based) of a stream.
    pub fn before_token(&self, i: u64) -> Duration {
        let mut wait = if i == 0 { self.first } else { Duration::ZERO };
        if let Some(tps) = self.tps
            && i > 0
        {
            wait += Duration::from_secs_f64(1.0 / tps);
        }
        if self.pause_every > 0 && i > 0 && i.is_multiple_of(self.pause_every) {
            wait += self.pause;
        }
        wait
    }

    /// How long producing `tokens` takes before a non-streamed answer is sent.
    pub fn generation_time(&self, tokens: u64) -> Duration {
        let rate = self.tps.map_or(Duration::ZERO, |tps| Duration::from_secs_f64(tokens as f64 / tps));
        (self.first + rate).min(Duration::from_secs(3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_from_the_model_name() {
        let p = Profile::of("mock@tokens=400,tps=50,first_ms=300,pause_ms=2000,pause_every=100,bytes=9");
        assert_eq!(p.tokens, Some(400));
        assert_eq!(p.tps, Some(50.0));
        assert_eq!(p.first, Duration::from_millis(300));
        assert_eq!(p.before_token(0), Duration::from_millis(300));
        assert_eq!(p.before_token(1), Duration::from_millis(20));
        assert_eq!(p.before_token(100), Duration::from_millis(2020));
        assert_eq!(p.generation_time(400), Duration::from_millis(8300));
        assert_eq!(p.bytes, Some(9));
        assert_eq!(Profile::of("mock-model"), Profile::default());
        assert_eq!(Profile::of("m@tokens=99999999999").tokens, Some(MAX_TOKENS));
    }
}
