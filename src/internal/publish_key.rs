//! Checking the publish key in constant time.
//!
//! The configured key is never compared byte by byte. At start-up a random HMAC key is drawn and
//! the publish key's tag under it is kept; a presented key is checked with `ring::hmac::verify`,
//! whose comparison is constant-time and whose running time does not depend on how many leading
//! bytes match, nor (beyond hashing) on the presented key's length.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The expected publish key, held as an HMAC tag.
pub struct PublishKey {
    key: hmac::Key,
    tag: hmac::Tag,
}

impl PublishKey {
    /// Holds `secret` as a tag under a fresh random key.
    pub fn new(secret: &[u8]) -> Self {
        let mut k = [0u8; 32];
        // A failing system RNG leaves a zero key: still a correct (if less blinded) comparison.
        let _ = SystemRandom::new().fill(&mut k);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &k);
        let tag = hmac::sign(&key, secret);
        PublishKey { key, tag }
    }

    /// Checks an `Authorization` header value of the form `Bearer <key>`.
    pub fn check_bearer(&self, header: &[u8]) -> bool {
        let Some(rest) = header
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
            .map(|_| &header[7..])
        else {
            return false;
        };
        let presented = rest.trim_ascii();
        hmac::verify(&self.key, presented, self.tag.as_ref()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_checks() {
        let k = PublishKey::new(b"s3cret-key");
        assert!(k.check_bearer(b"Bearer s3cret-key"));
        assert!(k.check_bearer(b"bearer s3cret-key "));
        assert!(!k.check_bearer(b"Bearer s3cret-ke"));
        assert!(!k.check_bearer(b"Bearer s3cret-key2"));
        assert!(!k.check_bearer(b"Basic s3cret-key"));
        assert!(!k.check_bearer(b"s3cret-key"));
        assert!(!k.check_bearer(b""));
    }
}
