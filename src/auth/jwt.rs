//! Compact JWS verification for stream tokens, and HS256 minting for `causeloop-stream token`.
//!
//! Order of checks, so that nothing unverified is trusted: size bound, shape, header (`alg`
//! pinned to the kind of key it is checked against, `crit` refused), signature against the live
//! keys (ring; HMAC comparison is constant-time), then claims. The token itself never appears in
//! an error: errors are [`AuthError`] variants with fixed labels.

use super::claims::{self, Value};
use super::keys::KeySet;
use super::{AuthError, Identity};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::{hmac, signature};

/// Tokens longer than this are refused without being parsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Header and claims nesting deeper than this is refused before parsing.
const MAX_JSON_DEPTH: usize = 16;

/// Claim rules from the configuration.
#[derive(Clone, Debug)]
pub struct Validation {
    /// Name of the claim holding the workspace id.
    pub workspace_claim: String,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (or one of its entries), when set.
    pub audience: Option<String>,
    /// Clock skew allowed for `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
    /// Longest `sub` and workspace claim accepted (`--max-id-bytes`); the same rule as publishes.
    pub max_id_bytes: usize,
}

impl Validation {
    /// The rules of a configuration; `max_id_bytes` is `--max-id-bytes`.
    pub fn of(cfg: &crate::config::JwtConfig, max_id_bytes: usize) -> Validation {
        Validation {
            workspace_claim: cfg.workspace_claim.clone(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_secs: cfg.leeway.as_secs(),
            max_id_bytes,
        }
    }
}

impl Default for Validation {
    fn default() -> Self {
        Validation {
            workspace_claim: "workspace_id".into(),
            issuer: None,
            audience: None,
            leeway_secs: 30,
            max_id_bytes: 256,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
}

/// Verifies `token` and returns the identity it asserts. `now` is seconds since the epoch.
/// `buf` is working space (the decoded parts; the identity borrows from it): a caller that
/// verifies many tokens passes the same one each time and allocates nothing once it has grown.
pub fn verify<'b>(
    token: &[u8],
    keys: &KeySet,
    rules: &Validation,
    now: u64,
    buf: &'b mut Vec<u8>,
) -> Result<Identity<'b>, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::TooLarge);
    }
    let mut parts = token.splitn(3, |&b| b == b'.');
    let (Some(h64), Some(c64), Some(s64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Malformed);
    };
    if s64.contains(&b'.') {
        return Err(AuthError::Malformed);
    }
    let signed = &token[..h64.len() + 1 + c64.len()];
    // The three parts decoded one after another into `buf`.
    buf.clear();
    let decode = |part: &[u8], buf: &mut Vec<u8>| {
        let from = buf.len();
        URL_SAFE_NO_PAD
            .decode_vec(part, buf)
            .map(|_| from..buf.len())
            .map_err(|_| AuthError::Malformed)
    };
    let h = decode(h64, buf)?;
    let c = decode(c64, buf)?;
    let s = decode(s64, buf)?;
    let buf: &'b [u8] = buf;
    let (alg, kid) = parse_header(&buf[h])?;
    verify_signature(alg, kid.as_deref(), signed, &buf[s], keys)?;
    check_claims(&buf[c], rules, now)
}

fn parse_header(header: &[u8]) -> Result<(Alg, Option<std::borrow::Cow<'_, str>>), AuthError> {
    if crate::json::max_depth(header) > MAX_JSON_DEPTH {
        return Err(AuthError::Malformed);
    }
    let h = claims::header(header).map_err(|_| AuthError::Malformed)?;
    if h.crit {
        return Err(AuthError::Algorithm);
    }
    let alg = match h.alg.as_ref().map(|a| a.as_str()) {
        Some(Some("HS256")) => Alg::Hs256,
        Some(Some("RS256")) => Alg::Rs256,
        Some(_) => return Err(AuthError::Algorithm),
        None => return Err(AuthError::Malformed),
    };
    let kid = match h.kid {
        None => None,
        Some(Value::Str(k)) => Some(k),
        Some(_) => return Err(AuthError::Malformed),
    };
    Ok((alg, kid))
}

/// Picks the candidate keys: those whose `kid` matches when any does, else those without a `kid`.
fn candidates<'k, K>(
    keys: &'k [K],
    kid: Option<&'k str>,
    kid_of: impl Fn(&K) -> Option<&str> + 'k,
) -> impl Iterator<Item = &'k K> + 'k {
    let matched = kid.is_some() && keys.iter().any(|k| kid_of(k) == kid);
    keys.iter().filter(move |k| {
        if matched {
            kid_of(k) == kid
        } else {
            kid_of(k).is_none()
        }
    })
}

fn verify_signature(
    alg: Alg,
    kid: Option<&str>,
    signed: &[u8],
    sig: &[u8],
    keys: &KeySet,
) -> Result<(), AuthError> {
    match alg {
        Alg::Hs256 => {
            if keys.hs256.is_empty() {
                return Err(AuthError::Algorithm);
            }
            for k in candidates(&keys.hs256, kid, |k| k.kid.as_deref()) {
                if hmac::verify(&k.key, signed, sig).is_ok() {
                    return Ok(());
                }
            }
        }
        Alg::Rs256 => {
            if keys.rs256.is_empty() {
                return Err(AuthError::Algorithm);
            }
            for k in candidates(&keys.rs256, kid, |k| k.kid.as_deref()) {
                let pk = signature::RsaPublicKeyComponents { n: &k.n, e: &k.e };
                if pk
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
                    .is_ok()
                {
                    return Ok(());
                }
            }
        }
    }
    Err(AuthError::Signature)
}

fn numeric(v: Option<&Value<'_>>) -> Result<Option<u64>, AuthError> {
    match v {
        None => Ok(None),
        Some(Value::Num(f)) if f.is_finite() && *f >= 0.0 => {
            Ok(Some(f.min(u64::MAX as f64) as u64))
        }
        Some(_) => Err(AuthError::Claims),
    }
}

fn check_claims<'b>(
    claims: &'b [u8],
    rules: &Validation,
    now: u64,
) -> Result<Identity<'b>, AuthError> {
    if crate::json::max_depth(claims) > MAX_JSON_DEPTH {
        return Err(AuthError::Malformed);
    }
    let mut c = claims::claims(claims, &rules.workspace_claim).map_err(|_| AuthError::Malformed)?;
    let exp = numeric(c.exp.as_ref())?.ok_or(AuthError::Claims)?;
    let leeway = rules.leeway_secs;
    if now >= exp.saturating_add(leeway) {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = numeric(c.nbf.as_ref())? {
        if nbf > now.saturating_add(leeway) {
            return Err(AuthError::NotYetValid);
        }
    }
    let iat = numeric(c.iat.as_ref())?;
    if let Some(iat) = iat {
        if iat > now.saturating_add(leeway) {
            return Err(AuthError::NotYetValid);
        }
    }
    // The ids become registry keys and appear in every `connected` frame and log line: the
    // same length and character rule as a publish's ids.
    let id = |v: Option<Value<'b>>| match v {
        Some(Value::Str(s)) if crate::event::id_ok(&s, rules.max_id_bytes) => Ok(s),
        _ => Err(AuthError::Claims),
    };
    let sub = id(c.sub.take())?;
    let ws = id(c.workspace.take())?;
    if let Some(iss) = &rules.issuer {
        if c.iss.as_ref().and_then(Value::as_str) != Some(iss.as_str()) {
            return Err(AuthError::Claims);
        }
    }
    if let Some(aud) = &rules.audience {
        let ok = match &c.aud {
            Some(Value::Str(a)) => a == aud,
            Some(Value::Strs(all)) => all.iter().any(|a| a == aud),
            _ => false,
        };
        if !ok {
            return Err(AuthError::Claims);
        }
    }
    Ok(Identity {
        user_id: sub,
        workspace_id: ws,
        exp,
        iat,
    })
}

/// Mints an HS256 token with `claims_json` (a JSON object) as its claims.
pub fn sign_hs256(secret: &[u8], claims_json: &[u8]) -> String {
    sign_hs256_with_header(secret, br#"{"alg":"HS256","typ":"JWT"}"#, claims_json)
}

/// Mints an HS256-signed token with an arbitrary header (tests use it for hostile headers).
pub fn sign_hs256_with_header(secret: &[u8], header_json: &[u8], claims_json: &[u8]) -> String {
    let mut out = URL_SAFE_NO_PAD.encode(header_json);
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(claims_json));
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), out.as_bytes());
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(tag.as_ref()));
    out
}

/// Claims for a token that `causeloop-stream token` and `--dev` mint.
pub fn claims_json(
    workspace_claim: &str,
    workspace: &str,
    user: &str,
    iat: u64,
    exp: u64,
) -> Vec<u8> {
    let mut out = b"{\"sub\":".to_vec();
    crate::json::write_string(&mut out, user);
    out.push(b',');
    crate::json::write_string(&mut out, workspace_claim);
    out.push(b':');
    crate::json::write_string(&mut out, workspace);
    out.extend_from_slice(format!(",\"iat\":{iat},\"exp\":{exp}}}").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn keys() -> KeySet {
        let mut k = KeySet::default();
        k.add_hs256(None, SECRET);
        k
    }

    fn token(claims: &str) -> String {
        sign_hs256(SECRET, claims.as_bytes())
    }

    fn check(t: &str) -> Result<(String, String, u64), AuthError> {
        with(t, &keys(), &Validation::default())
    }

    fn with(t: &str, ks: &KeySet, rules: &Validation) -> Result<(String, String, u64), AuthError> {
        let mut buf = Vec::new();
        verify(t.as_bytes(), ks, rules, NOW, &mut buf).map(|id| {
            (
                id.user_id.into_owned(),
                id.workspace_id.into_owned(),
                id.exp,
            )
        })
    }

    #[test]
    fn accepts_a_valid_token() {
        let id = check(&token(
            r#"{"sub":"usr_1","workspace_id":"ws_1","exp":1700000100,"iat":1699999990}"#,
        ))
        .unwrap();
        assert_eq!(id, ("usr_1".into(), "ws_1".into(), 1_700_000_100));
    }

    #[test]
    fn time_claims_honour_the_leeway() {
        assert!(check(&token(r#"{"sub":"u","workspace_id":"w","exp":1699999980}"#)).is_ok());
        assert_eq!(
            check(&token(r#"{"sub":"u","workspace_id":"w","exp":1699999970}"#)),
            Err(AuthError::Expired)
        );
        assert!(check(&token(
            r#"{"sub":"u","workspace_id":"w","exp":1800000000,"nbf":1700000030}"#
        ))
        .is_ok());
        assert_eq!(
            check(&token(
                r#"{"sub":"u","workspace_id":"w","exp":1800000000,"nbf":1700000031}"#
            )),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            check(&token(
                r#"{"sub":"u","workspace_id":"w","exp":1800000000,"iat":1700000099}"#
            )),
            Err(AuthError::NotYetValid)
        );
    }

    #[test]
    fn required_claims() {
        assert_eq!(
            check(&token(r#"{"workspace_id":"w","exp":1800000000}"#)),
            Err(AuthError::Claims)
        );
        assert_eq!(
            check(&token(r#"{"sub":"u","exp":1800000000}"#)),
            Err(AuthError::Claims)
        );
        assert_eq!(
            check(&token(r#"{"sub":"u","workspace_id":"w"}"#)),
            Err(AuthError::Claims)
        );
        assert_eq!(
            check(&token(r#"{"sub":"u","workspace_id":"w","exp":"soon"}"#)),
            Err(AuthError::Claims)
        );
        assert_eq!(
            check(&token(r#"{"sub":7,"workspace_id":"w","exp":1800000000}"#)),
            Err(AuthError::Claims)
        );
        assert_eq!(check(&token(r#"[1]"#)), Err(AuthError::Malformed));
    }

    #[test]
    fn repeated_names_in_header_or_claims_are_refused() {
        // The issuer's parser would keep the last member; refusing is the only safe reading.
        for claims in [
            r#"{"sub":"u","workspace_id":"w","exp":1700000100,"exp":1800000000}"#,
            r#"{"sub":"admin","sub":"u","workspace_id":"w","exp":1800000000}"#,
            r#"{"sub":"u","workspace_id":"w1","workspace_id":"w2","exp":1800000000}"#,
        ] {
            assert_eq!(check(&token(claims)), Err(AuthError::Malformed), "{claims}");
        }
        let twice = sign_hs256_with_header(
            SECRET,
            br#"{"alg":"RS256","alg":"HS256"}"#,
            br#"{"sub":"u","workspace_id":"w","exp":1800000000}"#,
        );
        assert_eq!(check(&twice), Err(AuthError::Malformed));
    }

    #[test]
    fn issuer_and_audience() {
        let rules = Validation {
            issuer: Some("iss-a".into()),
            audience: Some("aud-a".into()),
            ..Validation::default()
        };
        let ok = token(
            r#"{"sub":"u","workspace_id":"w","exp":1800000000,"iss":"iss-a","aud":["x","aud-a"]}"#,
        );
        assert!(with(&ok, &keys(), &rules).is_ok());
        let bad =
            token(r#"{"sub":"u","workspace_id":"w","exp":1800000000,"iss":"iss-b","aud":"aud-a"}"#);
        assert_eq!(with(&bad, &keys(), &rules), Err(AuthError::Claims));
        let no_aud = token(r#"{"sub":"u","workspace_id":"w","exp":1800000000,"iss":"iss-a"}"#);
        assert_eq!(with(&no_aud, &keys(), &rules), Err(AuthError::Claims));
    }

    #[test]
    fn shape_and_algorithm_attacks() {
        let claims = r#"{"sub":"u","workspace_id":"w","exp":1800000000}"#;
        let good = token(claims);
        assert_eq!(check(""), Err(AuthError::Missing));
        assert_eq!(check("abc"), Err(AuthError::Malformed));
        assert_eq!(check(&format!("{good}.x")), Err(AuthError::Malformed));
        assert_eq!(
            check(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(AuthError::TooLarge)
        );
        let mut tampered = good.clone();
        tampered.pop();
        tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(check(&tampered), Err(AuthError::Signature));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        );
        assert_eq!(check(&none), Err(AuthError::Algorithm));
        let rs = sign_hs256_with_header(SECRET, br#"{"alg":"RS256"}"#, claims.as_bytes());
        assert_eq!(
            check(&rs),
            Err(AuthError::Algorithm),
            "RS256 with no RSA key configured"
        );
        let crit = sign_hs256_with_header(
            SECRET,
            br#"{"alg":"HS256","crit":["x"]}"#,
            claims.as_bytes(),
        );
        assert_eq!(check(&crit), Err(AuthError::Algorithm));
        let deep = sign_hs256_with_header(
            SECRET,
            format!("{}{}", "[".repeat(40), "]".repeat(40)).as_bytes(),
            claims.as_bytes(),
        );
        assert_eq!(check(&deep), Err(AuthError::Malformed));
    }

    #[test]
    fn rotation_and_kid_selection() {
        let mut ks = KeySet::default();
        ks.add_hs256(Some("old".into()), b"old-secret");
        ks.add_hs256(Some("new".into()), b"new-secret");
        ks.add_hs256(None, b"plain-secret");
        let claims = br#"{"sub":"u","workspace_id":"w","exp":1800000000}"#;
        let rules = Validation::default();
        let t = sign_hs256_with_header(b"new-secret", br#"{"alg":"HS256","kid":"new"}"#, claims);
        assert!(with(&t, &ks, &rules).is_ok());
        let wrong_kid =
            sign_hs256_with_header(b"new-secret", br#"{"alg":"HS256","kid":"old"}"#, claims);
        assert_eq!(with(&wrong_kid, &ks, &rules), Err(AuthError::Signature));
        let plain = sign_hs256(b"plain-secret", claims);
        assert!(with(&plain, &ks, &rules).is_ok());
        let unknown_kid =
            sign_hs256_with_header(b"plain-secret", br#"{"alg":"HS256","kid":"zzz"}"#, claims);
        assert!(with(&unknown_kid, &ks, &rules).is_ok());
    }
}
