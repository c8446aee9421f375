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
use std::path::{Path, PathBuf};

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
pub enum KeyError {
    /// The file could not be opened or read (the system's reason).
    Read(PathBuf, String),
    /// The file is larger than `--max-key-file-bytes` (the limit).
    TooLarge(PathBuf, u64),
    /// A secret file with no secret line.
    NoSecret(PathBuf),
    /// A PEM or JWKS file whose content is unusable.
    Format(PathBuf, FormatError),
    /// A reload would leave no key at all; the old keys stay.
    NoKeyLeft,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Read(p, e) => write!(f, "{}: {e}", p.display()),
            KeyError::TooLarge(p, max) => write!(
                f,
                "{}: larger than {max} bytes (--max-key-file-bytes)",
                p.display()
            ),
            KeyError::NoSecret(p) => write!(f, "{}: no secret in the file", p.display()),
            KeyError::Format(p, e) => write!(f, "{}: {e}", p.display()),
            KeyError::NoKeyLeft => f.write_str("no key left after reload"),
        }
    }
}

impl std::error::Error for KeyError {}

/// What is wrong with a PEM or JWKS file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// A PEM file that is not text.
    NotText,
    /// A `-----BEGIN` line without its closing dashes.
    UnterminatedHeader,
    /// A PEM block without its END line (its label).
    NoEnd(String),
    /// A PEM block that is not a public key (its label).
    UnsupportedBlock(String),
    /// A PEM body that is not base64.
    NotBase64,
    /// A PEM block whose DER is not an RSA public key.
    NotRsa,
    /// No `PUBLIC KEY` block in the file.
    NoPublicKey,
    /// An RSA modulus of this many bits (2048 to 8192 are accepted).
    ModulusBits(usize),
    /// An RSA exponent of no bytes or more than four.
    Exponent,
    /// A JWKS nested deeper than 8 levels.
    TooDeep,
    /// A JWKS that is not JSON.
    NotJson,
    /// A JWKS without a `keys` array.
    NoKeys,
    /// A JWKS key without a member it needs (key index, member).
    Missing(usize, &'static str),
    /// A JWKS key member that is not base64url (key index, member).
    NotBase64Url(usize, &'static str),
    /// A JWKS `oct` key with an empty `k` (key index).
    EmptySecret(usize),
    /// A JWKS key that is unusable for one of the reasons above (its index).
    Key(usize, Box<FormatError>),
    /// A JWKS with no RS256 or HS256 key.
    NoUsableKey,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::NotText => f.write_str("not a PEM text file"),
            FormatError::UnterminatedHeader => f.write_str("unterminated PEM header"),
            FormatError::NoEnd(label) => write!(f, "no END line for {label}"),
            FormatError::UnsupportedBlock(label) => {
                write!(f, "unsupported PEM block \"{label}\" (expected PUBLIC KEY)")
            }
            FormatError::NotBase64 => f.write_str("PEM body is not base64"),
            FormatError::NotRsa => f.write_str("not an RSA public key"),
            FormatError::NoPublicKey => f.write_str("no PUBLIC KEY block"),
            FormatError::ModulusBits(bits) => {
                write!(f, "RSA modulus of {bits} bits (2048 to 8192 accepted)")
            }
            FormatError::Exponent => f.write_str("unusable RSA exponent"),
            FormatError::TooDeep => f.write_str("JWKS nested too deeply"),
            FormatError::NotJson => f.write_str("not valid JSON"),
            FormatError::NoKeys => f.write_str("no \"keys\" array"),
            FormatError::Missing(i, m) => write!(f, "key {i}: missing \"{m}\""),
            FormatError::NotBase64Url(i, m) => write!(f, "key {i}: \"{m}\" is not base64url"),
            FormatError::EmptySecret(i) => write!(f, "key {i}: empty \"k\""),
            FormatError::Key(i, e) => write!(f, "key {i}: {e}"),
            FormatError::NoUsableKey => f.write_str("no RS256 or HS256 key in the set"),
        }
    }
}

impl std::error::Error for FormatError {}

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
                return Err(KeyError::NoSecret(path.clone()));
            }
        }
        for path in &cfg.rs256_public_keys {
            let text = read_bounded(path, cfg.max_key_file_bytes)?;
            let keys = parse_pem_keys(&text).map_err(|e| KeyError::Format(path.clone(), e))?;
            set.rs256.extend(keys);
        }
        if let Some(path) = &cfg.jwks_file {
            let mut text = read_bounded(path, cfg.max_key_file_bytes)?;
            set.add_jwks(&mut text)
                .map_err(|e| KeyError::Format(path.clone(), e))?;
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
    pub fn add_jwks(&mut self, json: &mut [u8]) -> Result<usize, FormatError> {
        if crate::json::max_depth(json) > 8 {
            return Err(FormatError::TooDeep);
        }
        let doc = simd_json::to_borrowed_value(json).map_err(|_| FormatError::NotJson)?;
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or(FormatError::NoKeys)?;
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
                    self.rs256.push(
                        checked_rsa(kid, n, e).map_err(|m| FormatError::Key(i, Box::new(m)))?,
                    );
                    added += 1;
                }
                Some("oct") if alg.is_none() || alg == Some("HS256") => {
                    let k = b64_field(jwk.get("k").and_then(|v| v.as_str()), i, "k")?;
                    if k.is_empty() {
                        return Err(FormatError::EmptySecret(i));
                    }
                    self.add_hs256(kid, &k);
                    added += 1;
                }
                _ => {}
            }
        }
        if added == 0 {
            return Err(FormatError::NoUsableKey);
        }
        Ok(added)
    }

    /// Whether no key at all is configured.
    pub fn is_empty(&self) -> bool {
        self.hs256.is_empty() && self.rs256.is_empty()
    }
}

fn b64_field(v: Option<&str>, i: usize, name: &'static str) -> Result<Vec<u8>, FormatError> {
    let v = v.ok_or(FormatError::Missing(i, name))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(v.trim_end_matches('='))
        .map_err(|_| FormatError::NotBase64Url(i, name))
}

fn checked_rsa(kid: Option<String>, n: Vec<u8>, e: Vec<u8>) -> Result<RsaKey, FormatError> {
    let n = n[n.iter().position(|&b| b != 0).unwrap_or(n.len())..].to_vec();
    let e = e[e.iter().position(|&b| b != 0).unwrap_or(e.len())..].to_vec();
    // An empty modulus is zero bits (and refused below), not an underflow.
    let bits = n
        .first()
        .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(FormatError::ModulusBits(bits));
    }
    if e.is_empty() || e.len() > 4 {
        return Err(FormatError::Exponent);
    }
    Ok(RsaKey { kid, n, e })
}

/// Parses every `PUBLIC KEY` / `RSA PUBLIC KEY` block of a PEM file.
pub fn parse_pem_keys(text: &[u8]) -> Result<Vec<RsaKey>, FormatError> {
    let text = std::str::from_utf8(text).map_err(|_| FormatError::NotText)?;
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let label_end = after.find("-----").ok_or(FormatError::UnterminatedHeader)?;
        let label = &after[..label_end];
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let body_end = body_start
            .find(&end_marker)
            .ok_or_else(|| FormatError::NoEnd(label.to_string()))?;
        let b64: String = body_start[..body_end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        rest = &body_start[body_end + end_marker.len()..];
        if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
            return Err(FormatError::UnsupportedBlock(label.to_string()));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| FormatError::NotBase64)?;
        let (n, e) = rsa_public_key(&der).ok_or(FormatError::NotRsa)?;
        keys.push(checked_rsa(None, n, e)?);
    }
    if keys.is_empty() {
        return Err(FormatError::NoPublicKey);
    }
    Ok(keys)
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, KeyError> {
    use std::io::Read;
    let read_error = |e: std::io::Error| KeyError::Read(path.to_path_buf(), e.to_string());
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut buf = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(read_error)?;
    if buf.len() as u64 > max {
        return Err(KeyError::TooLarge(path.to_path_buf(), max));
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
