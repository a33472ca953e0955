//! Webhook signing secrets sealed at rest: AES-256-GCM (ring, the crypto
//! library the TLS stack already builds) under a keyring read from a
//! mounted file (`webhooks.secret_keys_file`).
//!
//! The file holds one key per line, `<id> <base64 of 32 random bytes>`
//! (`#` comments and blank lines are skipped). The first key seals; every
//! key opens. A sealed value is `sealed:v1:<key id>:<base64 of nonce ‖
//! ciphertext ‖ tag>`, bound to its place (the tenant of an endpoint, the
//! job of a per-job webhook) as associated data, so a sealed value copied to
//! another tenant's row does not open there. Rotation: the README's Webhooks
//! section.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const PREFIX: &str = "sealed:v1:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("webhooks.secret_keys_file is not set: webhook secrets are sealed with its keys (README, Webhooks)")]
    NotConfigured,
    #[error("cannot read the webhook secret keys file {path}: {message}")]
    Read { path: String, message: String },
    #[error("webhook secret keys file, line {line}: {message}")]
    Parse { line: usize, message: String },
    #[error("the webhook secret keys file has no key")]
    Empty,
    #[error("sealed with key {0:?}, which is not in the keyring")]
    UnknownKey(String),
    #[error("a sealed secret that does not open (corrupted, or sealed for another place)")]
    Corrupt,
    #[error("a stored secret that is neither sealed nor a webhook secret")]
    NotSealed,
    #[error("cannot draw a random nonce")]
    Random,
}

/// The keys that seal and open webhook secrets; the first one seals.
pub struct Keyring {
    keys: Vec<(String, LessSafeKey)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keyring").field("ids", &ids).finish()
    }
}

impl Keyring {
    /// Reads the keyring from its file.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SealError::Read { path: path.display().to_string(), message: e.to_string() })?;
        Self::parse(&text)
    }

    /// Parses the file's text (see the module's documentation).
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let mut keys: Vec<(String, LessSafeKey)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| SealError::Parse { line: n + 1, message: message.to_owned() };
            let (id, encoded) =
                line.split_once(char::is_whitespace).ok_or_else(|| bad("expected `<id> <base64 key>`"))?;
            let valid_id = !id.is_empty()
                && id.len() <= 32
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_id {
                return Err(bad("a key id is 1 to 32 letters, digits, `-` or `_`"));
            }
            if keys.iter().any(|(known, _)| known == id) {
                return Err(bad("a key id appears twice"));
            }
            let bytes = STANDARD.decode(encoded.trim()).map_err(|_| bad("the key is not base64"))?;
            let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| bad("a key is 32 bytes"))?;
            keys.push((id.to_owned(), LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err(SealError::Empty);
        }
        Ok(Self { keys })
    }

    /// A new key line for the file: a fresh id (from the date) and 32 random bytes.
    pub fn new_key_line(id: &str) -> Result<String, SealError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|_| SealError::Random)?;
        Ok(format!("{id} {}", STANDARD.encode(key)))
    }

    /// The id of the key that seals.
    pub fn current(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `secret` for `place` (an endpoint's tenant, a job).
    pub fn seal(&self, place: &[u8], secret: &str) -> Result<String, SealError> {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut data = secret.as_bytes().to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(place), &mut data)
            .map_err(|_| SealError::Corrupt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{PREFIX}{id}:{}", STANDARD.encode(out)))
    }

    /// Opens a stored secret sealed for `place`. A value in clear (a
    /// `whsec_` secret stored before sealing existed) is returned as it is:
    /// workers seal those they find in Postgres at start ([`Keyring::is_current`]).
    pub fn open(&self, place: &[u8], stored: &str) -> Result<String, SealError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return if stored.starts_with(crate::webhook::SECRET_PREFIX) {
                Ok(stored.to_owned())
            } else {
                Err(SealError::NotSealed)
            };
        };
        let (id, encoded) = rest.split_once(':').ok_or(SealError::Corrupt)?;
        let (_, key) =
            self.keys.iter().find(|(known, _)| known == id).ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let mut data = STANDARD.decode(encoded).map_err(|_| SealError::Corrupt)?;
        if data.len() < NONCE_LEN {
            return Err(SealError::Corrupt);
        }
        let mut body = data.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&data).map_err(|_| SealError::Corrupt)?;
        let plain = key.open_in_place(nonce, Aad::from(place), &mut body).map_err(|_| SealError::Corrupt)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Corrupt)
    }

    /// Whether a stored value is sealed with the current key (a value that
    /// is not is sealed again, with it, when a worker starts).
    pub fn is_current(&self, stored: &str) -> bool {
        stored.strip_prefix(PREFIX).and_then(|rest| rest.split_once(':')).is_some_and(|(id, _)| id == self.current())
    }
}

/// The place an endpoint's secret is sealed for.
pub fn endpoint_place(tenant: uuid::Uuid) -> Vec<u8> {
    format!("endpoint:{tenant}").into_bytes()
}

/// The place a per-job webhook's secret is sealed for.
pub fn job_place(job: uuid::Uuid) -> Vec<u8> {
    format!("job:{job}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(lines: &[&str]) -> Keyring {
        Keyring::parse(&lines.join("\n")).unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_only_in_its_place_and_hides_the_secret() {
        let line = Keyring::new_key_line("k1").unwrap();
        let keys = ring(&["# current key first", &line]);
        let sealed = keys.seal(b"job:a", "whsec_c2VjcmV0").unwrap();
        assert!(sealed.starts_with("sealed:v1:k1:"), "{sealed}");
        assert!(!sealed.contains("c2VjcmV0"));
        assert_ne!(sealed, keys.seal(b"job:a", "whsec_c2VjcmV0").unwrap(), "a fresh nonce each time");
        assert_eq!(keys.open(b"job:a", &sealed).unwrap(), "whsec_c2VjcmV0");
        assert_eq!(keys.open(b"job:b", &sealed), Err(SealError::Corrupt));
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(keys.open(b"job:a", std::str::from_utf8(&tampered).unwrap()), Err(SealError::Corrupt));
        assert_eq!(keys.open(b"job:a", "sealed:v1:k1:"), Err(SealError::Corrupt));
    }

    #[test]
    fn after_a_rotation_the_new_key_seals_and_the_old_one_still_opens() {
        let (old, new) = (Keyring::new_key_line("old").unwrap(), Keyring::new_key_line("new").unwrap());
        let before = ring(&[&old]);
        let sealed_before = before.seal(b"p", "whsec_x").unwrap();
        let after = ring(&[&new, &old]);
        assert_eq!(after.open(b"p", &sealed_before).unwrap(), "whsec_x");
        assert!(!after.is_current(&sealed_before));
        let sealed_after = after.seal(b"p", "whsec_x").unwrap();
        assert!(after.is_current(&sealed_after));
        assert_eq!(before.open(b"p", &sealed_after), Err(SealError::UnknownKey("new".into())));
        // A secret stored in clear before sealing existed still opens; it is not current.
        assert_eq!(after.open(b"p", "whsec_x").unwrap(), "whsec_x");
        assert!(!after.is_current("whsec_x"));
        assert_eq!(after.open(b"p", "something else"), Err(SealError::NotSealed));
    }

    #[test]
    fn a_bad_keys_file_is_refused_with_its_line() {
        let parse = |t: &str| Keyring::parse(t).unwrap_err();
        assert_eq!(parse("# nothing\n\n"), SealError::Empty);
        assert!(matches!(parse("k1"), SealError::Parse { line: 1, .. }));
        assert!(matches!(parse("k1 c2hvcnQ="), SealError::Parse { line: 1, .. }), "a short key");
        assert!(matches!(parse("k1 !!!"), SealError::Parse { line: 1, .. }));
        let line = Keyring::new_key_line("k1").unwrap();
        assert!(matches!(parse(&format!("{line}\n{line}")), SealError::Parse { line: 2, .. }));
        assert!(matches!(parse(&line.replace("k1", "bad:id")), SealError::Parse { line: 1, .. }));
        assert_eq!(format!("{:?}", ring(&[&line])), "Keyring { ids: [\"k1\"] }", "keys never print");
    }
}
