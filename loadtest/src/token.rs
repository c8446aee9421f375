//! HS256 tokens, minted from a secret the load tester is given by environment (never argv).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

/// Mints a token for (workspace, user), valid for `ttl_secs` from `now_secs`.
pub fn mint(
    key: &hmac::Key,
    claim: &str,
    workspace: &str,
    user: &str,
    now_secs: u64,
    ttl_secs: u64,
) -> String {
    let claims = serde_json::json!({"sub": user, claim: workspace, "iat": now_secs, "exp": now_secs + ttl_secs});
    let mut out = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
    let tag = hmac::sign(key, out.as_bytes());
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(tag.as_ref()));
    out
}
