//! Authentication of stream connections: JWT verification with ring, and the key sets it uses.
//!
//! - [`jwt`]: verifying a compact JWS (HS256/RS256) and validating its claims, a pure function of
//!   the token bytes, a [`keys::KeySet`], the [`jwt::Validation`] rules and `now`.
//! - [`keys`]: loading HS256 secrets, PEM public keys and JWKS files into a [`keys::KeySet`].
//! - [`claims`]: reading a token's header and claims (one pass; repeated names refused).
//! - [`der`]: the little DER it takes to read an RSA public key.

pub mod claims;
pub mod der;
pub mod jwt;
pub mod keys;

use crate::ws::close::CloseReason;

/// Why a connection's token was refused. Each maps to one close reason and one metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No `token` query parameter, or an empty one.
    Missing,
    /// Longer than the 8 KiB bound; refused without being parsed.
    TooLarge,
    /// Not three base64url parts, or a header/claims part that is not the JSON expected.
    Malformed,
    /// `alg` other than HS256/RS256, or no configured key of that algorithm's kind.
    Algorithm,
    /// No configured key verifies the signature.
    Signature,
    /// `exp` (plus leeway) has passed.
    Expired,
    /// `nbf` or `iat` is in the future beyond the leeway.
    NotYetValid,
    /// A required claim is missing or has the wrong type, or `iss`/`aud` do not match.
    Claims,
    /// Valid token, but its workspace claim differs from `workspace` (or `workspace` is missing).
    WorkspaceMismatch,
}

impl AuthError {
    /// The close frame a refused connection receives.
    pub fn close_reason(self) -> CloseReason {
        match self {
            AuthError::Expired => CloseReason::TokenExpired,
            AuthError::NotYetValid => CloseReason::TokenNotYetValid,
            AuthError::WorkspaceMismatch => CloseReason::WorkspaceMismatch,
            _ => CloseReason::InvalidToken,
        }
    }

    /// A bounded label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::TooLarge | AuthError::Malformed => "malformed",
            AuthError::Algorithm | AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Claims => "claims",
            AuthError::WorkspaceMismatch => "workspace_mismatch",
        }
    }
}

/// Who a verified token says the connection is; borrows from the buffer the token was decoded
/// into (an id with JSON escapes is owned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity<'a> {
    /// The `sub` claim.
    pub user_id: std::borrow::Cow<'a, str>,
    /// The workspace claim.
    pub workspace_id: std::borrow::Cow<'a, str>,
    /// `exp`, seconds since the epoch.
    pub exp: u64,
    /// `iat`, seconds since the epoch, when the token has one.
    pub iat: Option<u64>,
}
