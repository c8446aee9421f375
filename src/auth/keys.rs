//! Key sets: every key that may verify a token right now.
//!
//! Several keys may be live at once (rotation): all configured HS256 secrets, every PEM public key
//! and every usable key of the JWKS file. A [`KeySet`] is immutable; reloading (SIGHUP) builds a
//! new one and hands it to the shards, so a broken file never leaves a half-loaded set behind.

use super::der::rsa_public_key;
use crate::config::{JwtConfig, Secret};
use base64::Engine;
use ring::hmac;
use simd_json::prelude::*;
use std::fmt;
use std::path::Path;

/// RSA moduli ring accepts for RS256 verification.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// An HS256 key.
pub struct HsKey {
    /// The JWKS `kid`, if the key came from a JWKS file.
    pub kid: Option<String>,
    /// The HMAC-SHA256 key.
    pub key: hmac::Key,
}

/// An RS256 public key.
pub struct RsaKey {
    /// The JWKS `kid`, if the key came from a JWKS file.
    pub kid: Option<String>,
    /// Modulus, big-endian, no leading zeros.
    pub n: Vec<u8>,
    /// Public exponent, big-endian, no leading zeros.
    pub e: Vec<u8>,
}

/// Every key that may verify a token.
#[derive(Default)]
pub struct KeySet {
    /// HS256 secrets.
    pub hs256: Vec<HsKey>,
    /// RS256 public keys.
    pub rs256: Vec<RsaKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeySet {{ hs256: {} key(s), rs256: {} key(s) }}",
            self.hs256.len(),
            self.rs256.len()
        )
    }
}

/// Why keys could not be loaded. The message names the file and the problem, never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

impl KeySet {
    /// Loads every key the configuration names. Fails as a whole if any file is unusable.
    pub fn load(cfg: &JwtConfig) -> Result<KeySet, KeyError> {
        let mut set = KeySet::default();
        for secret in &cfg.hs256_secrets {
            set.add_hs256(None, secret.expose());
        }
        if let Some(path) = &cfg.hs256_secret_file {
            let text = read_bounded(path, cfg.max_key_file_bytes)?;
            let mut any = false;
            for line in text.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.is_empty() {
                    set.add_hs256(None, line);
                    any = true;
                }
            }
            if !any {
                return Err(KeyError(format!(
                    "{}: no secret in the file",
                    path.display()
                )));
            }
        }
        for path in &cfg.rs256_public_keys {
            let text = read_bounded(path, cfg.max_key_file_bytes)?;
            let keys =
                parse_pem_keys(&text).map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
            set.rs256.extend(keys);
        }
        if let Some(path) = &cfg.jwks_file {
            let mut text = read_bounded(path, cfg.max_key_file_bytes)?;
            set.add_jwks(&mut text)
                .map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
        }
        Ok(set)
    }

    /// Adds an HS256 secret.
    pub fn add_hs256(&mut self, kid: Option<String>, secret: &[u8]) {
        self.hs256.push(HsKey {
            kid,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        });
    }

    /// Adds every usable key of an RFC 7517 key set. Keys of other types or algorithms are skipped
    /// (as RFC 7517 asks); a set with no usable key at all is an error.
    pub fn add_jwks(&mut self, json: &mut [u8]) -> Result<usize, String> {
        if crate::json::max_depth(json) > 8 {
            return Err("JWKS nested too deeply".into());
        }
        let doc = simd_json::to_borrowed_value(json).map_err(|_| "not valid JSON".to_string())?;
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("no \"keys\" array")?;
        let mut added = 0;
        for (i, jwk) in keys.iter().enumerate() {
            let kid = jwk.get("kid").and_then(|v| v.as_str()).map(str::to_owned);
            let alg = jwk.get("alg").and_then(|v| v.as_str());
            if matches!(jwk.get("use").and_then(|v| v.as_str()), Some(u) if u != "sig") {
                continue;
            }
            match jwk.get("kty").and_then(|v| v.as_str()) {
                Some("RSA") if alg.is_none() || alg == Some("RS256") => {
                    let n = b64_field(jwk.get("n").and_then(|v| v.as_str()), i, "n")?;
                    let e = b64_field(jwk.get("e").and_then(|v| v.as_str()), i, "e")?;
                    self.rs256
                        .push(checked_rsa(kid, n, e).map_err(|m| format!("key {i}: {m}"))?);
                    added += 1;
                }
                Some("oct") if alg.is_none() || alg == Some("HS256") => {
                    let k = b64_field(jwk.get("k").and_then(|v| v.as_str()), i, "k")?;
                    if k.is_empty() {
                        return Err(format!("key {i}: empty \"k\""));
                    }
                    self.add_hs256(kid, &k);
                    added += 1;
                }
                _ => {}
            }
        }
        if added == 0 {
            return Err("no RS256 or HS256 key in the set".into());
        }
        Ok(added)
    }

    /// Whether no key at all is configured.
    pub fn is_empty(&self) -> bool {
        self.hs256.is_empty() && self.rs256.is_empty()
    }
}

fn b64_field(v: Option<&str>, i: usize, name: &str) -> Result<Vec<u8>, String> {
    let v = v.ok_or_else(|| format!("key {i}: missing \"{name}\""))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(v.trim_end_matches('='))
        .map_err(|_| format!("key {i}: \"{name}\" is not base64url"))
}

fn checked_rsa(kid: Option<String>, n: Vec<u8>, e: Vec<u8>) -> Result<RsaKey, String> {
    let n = n[n.iter().position(|&b| b != 0).unwrap_or(n.len())..].to_vec();
    let e = e[e.iter().position(|&b| b != 0).unwrap_or(e.len())..].to_vec();
    // An empty modulus is zero bits (and refused below), not an underflow.
    let bits = n
        .first()
        .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(format!(
            "RSA modulus of {bits} bits (2048 to 8192 accepted)"
        ));
    }
    if e.is_empty() || e.len() > 4 {
        return Err("unusable RSA exponent".into());
    }
    Ok(RsaKey { kid, n, e })
}

/// Parses every `PUBLIC KEY` / `RSA PUBLIC KEY` block of a PEM file.
pub fn parse_pem_keys(text: &[u8]) -> Result<Vec<RsaKey>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "not a PEM text file".to_string())?;
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let label_end = after.find("-----").ok_or("unterminated PEM header")?;
        let label = &after[..label_end];
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let body_end = body_start
            .find(&end_marker)
            .ok_or_else(|| format!("no END line for {label}"))?;
        let b64: String = body_start[..body_end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        rest = &body_start[body_end + end_marker.len()..];
        if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
            return Err(format!(
                "unsupported PEM block \"{label}\" (expected PUBLIC KEY)"
            ));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "PEM body is not base64".to_string())?;
        let (n, e) = rsa_public_key(&der).ok_or("not an RSA public key")?;
        keys.push(checked_rsa(None, n, e)?);
    }
    if keys.is_empty() {
        return Err("no PUBLIC KEY block".into());
    }
    Ok(keys)
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, KeyError> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
    let mut buf = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| KeyError(format!("{}: {e}", path.display())))?;
    if buf.len() as u64 > max {
        return Err(KeyError(format!(
            "{}: larger than {max} bytes (--max-key-file-bytes)",
            path.display()
        )));
    }
    Ok(buf)
}

/// Builds a key set from in-memory secrets (used by `--dev` and tests).
pub fn from_secrets(secrets: &[Secret]) -> KeySet {
    let mut set = KeySet::default();
    for s in secrets {
        set.add_hs256(None, s.expose());
    }
    set
}
