//! TLS on the public listener: the certificate pair, the rustls server configuration every
//! shard's handshakes share, and its reload (SIGHUP).
//!
//! One [`ServerConfig`] serves every shard. Its certificate comes from a resolver holding the
//! pair in force; a reload swaps that pair, so new handshakes use the new certificate and open
//! connections (whose handshakes are done) are untouched. A pair that cannot be read, parsed or
//! matched is refused and the old one stays.
//!
//! The shards drive each connection's `rustls::ServerConnection` from their own poll loops (see
//! `shard::io`): no async runtime, no extra thread.

use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Largest certificate or key file read (a chain of a few certificates is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// `--tls-cert` and `--tls-key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a certificate pair was refused.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read(PathBuf, std::io::Error),
    /// A file is larger than any certificate chain or key.
    TooLarge(PathBuf),
    /// The certificate file holds no certificate.
    NoCertificate(PathBuf),
    /// The key file holds no private key, or one rustls cannot use.
    BadKey(PathBuf, String),
    /// The key is not the certificate's.
    Mismatch(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            TlsError::TooLarge(p) => {
                write!(f, "{} is larger than {MAX_PEM_BYTES} bytes", p.display())
            }
            TlsError::NoCertificate(p) => {
                write!(f, "{} holds no PEM certificate", p.display())
            }
            TlsError::BadKey(p, e) => write!(f, "{}: no usable private key: {e}", p.display()),
            TlsError::Mismatch(e) => {
                write!(f, "the private key does not match the certificate: {e}")
            }
        }
    }
}

impl std::error::Error for TlsError {}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| TlsError::Read(path.into(), e))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TlsError::Read(path.into(), e))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge(path.into()));
    }
    Ok(bytes)
}

/// The pair `files` name, read, parsed and matched: what handshakes present.
fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = read_bounded(&files.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    let key_pem = read_bounded(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::BadKey(files.key.clone(), e.to_string()))?;
    let provider = ring();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey(files.key.clone(), e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    // A key whose public half cannot be told (rare key types) is taken on trust, as rustls does.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(TlsError::Mismatch(e.to_string())),
    }
    Ok(Arc::new(certified))
}

/// The ring provider: ring is already the JWT crypto, and the binary carries one crypto
/// library. rustls marks it deprecated because its key exchange has no post-quantum hybrid
/// (X25519MLKEM768 needs aws-lc-rs); docs/security.md says when to terminate TLS in front
/// instead.
#[allow(deprecated)]
fn ring() -> rustls::crypto::CryptoProvider {
    provider::default_provider()
}

/// Hands every handshake the pair in force.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The public listener's TLS: the shared configuration and the pair behind it.
pub struct Tls {
    files: TlsFiles,
    config: Arc<ServerConfig>,
    resolver: Arc<Resolver>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads the pair and builds the configuration: TLS 1.3 and 1.2, ALPN `http/1.1`, no client
    /// certificates.
    pub fn new(files: TlsFiles) -> Result<Tls, TlsError> {
        let resolver = Arc::new(Resolver {
            current: RwLock::new(load(&files)?),
        });
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            files,
            config: Arc::new(config),
            resolver,
        })
    }

    /// The configuration every handshake uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Reads both files again; on success new handshakes present the new certificate. On error
    /// the pair in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load(&self.files)?;
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// The certificate in force's notAfter, Unix seconds (0 if it could not be read), read from
    /// the pair the resolver holds.
    pub fn not_after(&self) -> i64 {
        let current = self
            .resolver
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        current
            .end_entity_cert()
            .ok()
            .and_then(|c| not_after(c))
            .unwrap_or(0)
    }
}

/// A DER element: its tag, its contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An X.509 `Time` (UTCTime or GeneralizedTime, `Z` form), Unix seconds.
fn x509_time(tag: u8, body: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(body).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (mo, d, h, mi, s) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3_600 + mi * 60 + s)
}

/// A certificate's notAfter, Unix seconds: `tbsCertificate`'s `validity`, the fifth element
/// after an optional `[0]` version.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, after) = der(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        rest = der(rest)?.2;
    }
    let (0x30, validity, _) = der(rest)? else {
        return None;
    };
    let (_, _, after_before) = der(validity)?;
    let (tag, body, _) = der(after_before)?;
    x509_time(tag, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 5), 20_792);
    }

    #[test]
    fn times_in_both_forms() {
        assert_eq!(x509_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(x509_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(x509_time(0x18, b"20261205000000Z"), Some(20_792 * 86_400));
        assert_eq!(x509_time(0x17, b"2612050000Z"), None);
        assert_eq!(x509_time(0x18, b"20261305000000Z"), None);
        assert_eq!(x509_time(0x17, b"261205000000+0100"), None);
    }

    #[test]
    fn truncated_der_is_refused_not_panicked_on() {
        let cert = [0x30, 0x82, 0x01, 0x00, 0x30];
        assert_eq!(not_after(&cert), None);
        for n in 0..cert.len() {
            assert_eq!(not_after(&cert[..n]), None);
        }
    }
}
