//! WAMP-CRA (advanced profile, challenge-response authentication): signing a
//! router's challenge with our secret, salted or not, as Autobahn does.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;

/// What a `wampcra` CHALLENGE's `extra` carries: the challenge string to sign, and,
/// when the router keeps salted secrets, how to derive the key from ours.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CraChallenge {
    pub challenge: String,
    #[serde(default)]
    pub salt: Option<String>,
    #[serde(default)]
    pub iterations: Option<u32>,
    #[serde(default)]
    pub keylen: Option<usize>,
}

impl CraChallenge {
    pub fn from_extra(extra: &RawValue) -> Result<CraChallenge, serde_json::Error> {
        serde_json::from_str(extra.get())
    }

    /// The signature for AUTHENTICATE: HMAC-SHA256 of the challenge string, keyed
    /// with the secret or, for a salted challenge, with [`derive_key`] of it.
    pub fn sign(&self, secret: &[u8]) -> Result<String, CraError> {
        match &self.salt {
            None => Ok(cra_sign(secret, self.challenge.as_bytes())),
            Some(salt) => {
                // Autobahn's defaults when a salted challenge leaves them out.
                let iterations = self.iterations.unwrap_or(1000);
                let keylen = self.keylen.unwrap_or(32);
                let key = derive_key(secret, salt.as_bytes(), iterations, keylen)?;
                Ok(cra_sign(key.as_bytes(), self.challenge.as_bytes()))
            }
        }
    }
}

/// A salted challenge this side cannot derive a key for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CraError {
    #[error("WAMP-CRA: iterations must be at least 1")]
    NoIterations,
    #[error("WAMP-CRA: keylen {0} is out of range (1..=1024)")]
    KeyLength(usize),
}

/// base64(HMAC-SHA256(key, challenge)).
pub fn cra_sign(key: &[u8], challenge: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, challenge);
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// base64(PBKDF2-HMAC-SHA256(secret, salt, iterations, keylen)): the key a salted
/// challenge is signed with, as Autobahn's `derive_key` computes it (the base64 text,
/// not the raw bytes, is the HMAC key).
pub fn derive_key(
    secret: &[u8],
    salt: &[u8],
    iterations: u32,
    keylen: usize,
) -> Result<String, CraError> {
    let iterations = std::num::NonZeroU32::new(iterations).ok_or(CraError::NoIterations)?;
    if !(1..=1024).contains(&keylen) {
        return Err(CraError::KeyLength(keylen));
    }
    let mut key = vec![0u8; keylen];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        secret,
        &mut key,
    );
    Ok(base64::engine::general_purpose::STANDARD.encode(&key))
}
