//! Reading a token's header and claims: one pass of serde_json over each decoded part, taking
//! out the members verification uses and refusing any object with a repeated key.
//!
//! RFC 7519 §4 lets a parser keep either of two members with one name; issuers' libraries
//! mostly keep the last, and a verifier that kept the first would read another `exp`, `sub` or
//! workspace than the issuer meant. So a repeated name anywhere in the header or the claims
//! makes the token malformed. Pure: bytes in, members out.

use crate::json::{Key, KeySet, UniqueKeys};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

/// One member's value, as far as verification cares.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// A string.
    Str(Cow<'a, str>),
    /// A number.
    Num(f64),
    /// An array: its strings (other elements are left out).
    Strs(Vec<Cow<'a, str>>),
    /// Anything else (`true`, `null`, an object).
    Other,
}

impl<'a> Value<'a> {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The members of a JOSE header that verification reads.
#[derive(Debug, Default, PartialEq)]
pub struct Header<'a> {
    /// `alg`.
    pub alg: Option<Value<'a>>,
    /// `kid`.
    pub kid: Option<Value<'a>>,
    /// Whether `crit` is present (no extension is understood, so any is refused).
    pub crit: bool,
}

/// The claims verification reads.
#[derive(Debug, Default, PartialEq)]
pub struct Claims<'a> {
    /// `exp`.
    pub exp: Option<Value<'a>>,
    /// `nbf`.
    pub nbf: Option<Value<'a>>,
    /// `iat`.
    pub iat: Option<Value<'a>>,
    /// `sub`.
    pub sub: Option<Value<'a>>,
    /// The configured workspace claim.
    pub workspace: Option<Value<'a>>,
    /// `iss`.
    pub iss: Option<Value<'a>>,
    /// `aud`.
    pub aud: Option<Value<'a>>,
}

/// The part is not one JSON object with unique member names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// Reads a header: a JSON object with unique names.
pub fn header(json: &[u8]) -> Result<Header<'_>, Malformed> {
    let mut h = Header::default();
    read_object(json, |name, value| match name {
        "alg" => h.alg = Some(value),
        "kid" => h.kid = Some(value),
        "crit" => h.crit = true,
        _ => {}
    })?;
    Ok(h)
}

/// Reads a claims set: a JSON object with unique names; `workspace_claim` names the member
/// holding the workspace.
pub fn claims<'a>(json: &'a [u8], workspace_claim: &str) -> Result<Claims<'a>, Malformed> {
    let mut c = Claims::default();
    read_object(json, |name, value| {
        if name == workspace_claim {
            c.workspace = Some(value.clone());
        }
        match name {
            "exp" => c.exp = Some(value),
            "nbf" => c.nbf = Some(value),
            "iat" => c.iat = Some(value),
            "sub" => c.sub = Some(value),
            "iss" => c.iss = Some(value),
            "aud" => c.aud = Some(value),
            _ => {}
        }
    })?;
    Ok(c)
}

/// Walks one top-level object, handing each member to `member`.
fn read_object<'a>(json: &'a [u8], member: impl FnMut(&str, Value<'a>)) -> Result<(), Malformed> {
    let mut de = serde_json::Deserializer::from_slice(json);
    de.deserialize_map(Object { member })
        .and_then(|()| de.end())
        .map_err(|_| Malformed)
}

struct Object<F> {
    member: F,
}

impl<'de, F: FnMut(&str, Value<'de>)> Visitor<'de> for Object<F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut names = KeySet::default();
        while let Some(name) = map.next_key_seed(Key)? {
            let value = map.next_value_seed(AnyValue)?;
            (self.member)(&name, value);
            names.insert(name)?;
        }
        Ok(())
    }
}

/// Any JSON value, kept as far as [`Value`] keeps it; nested objects are checked for repeated
/// names and dropped.
struct AnyValue;

impl<'de> DeserializeSeed<'de> for AnyValue {
    type Value = Value<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AnyValue {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Value<'de>, E> {
        Ok(Value::Other)
    }
    fn visit_unit<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value<'de>, E> {
        Ok(Value::Num(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value<'de>, E> {
        Ok(Value::Num(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value<'de>, E> {
        Ok(Value::Num(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        let mut strs = Vec::new();
        while let Some(v) = seq.next_element_seed(AnyValue)? {
            if let Value::Str(s) = v {
                strs.push(s);
            }
        }
        Ok(Value::Strs(strs))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value<'de>, A::Error> {
        UniqueKeys.visit_map(map)?;
        Ok(Value::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_members_it_needs() {
        let c = claims(
            br#"{"sub":"u\u0031","workspace_id":"w","exp":1.5e9,"iat":7,"aud":["a",3,"b"],"x":{"y":[1]}}"#,
            "workspace_id",
        )
        .unwrap();
        assert_eq!(c.sub, Some(Value::Str("u1".into())));
        assert_eq!(c.workspace.as_ref().and_then(Value::as_str), Some("w"));
        assert_eq!(c.exp, Some(Value::Num(1.5e9)));
        assert_eq!(c.iat, Some(Value::Num(7.0)));
        assert_eq!(c.aud, Some(Value::Strs(vec!["a".into(), "b".into()])));
        assert_eq!(c.nbf, None);
        // The workspace claim may be any member, one verification also reads included.
        let c = claims(br#"{"sub":"u","exp":1}"#, "sub").unwrap();
        assert_eq!(c.workspace, c.sub);
        let h = header(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#).unwrap();
        assert_eq!(h.alg.as_ref().and_then(Value::as_str), Some("HS256"));
        assert_eq!(h.kid.as_ref().and_then(Value::as_str), Some("k1"));
        assert!(!h.crit);
        assert!(header(br#"{"alg":"HS256","crit":[]}"#).unwrap().crit);
    }

    #[test]
    fn a_repeated_name_anywhere_is_malformed() {
        for bad in [
            &br#"{"sub":"a","sub":"b","exp":1}"#[..],
            br#"{"exp":1,"exp":99999999999}"#,
            br#"{"workspace_id":"a","workspace_id":"b"}"#,
            br#"{"sub":"a","\u0073ub":"b"}"#,
            br#"{"x":{"k":1,"k":2}}"#,
            br#"{"aud":[{"k":1,"k":2}]}"#,
        ] {
            assert_eq!(claims(bad, "workspace_id"), Err(Malformed), "{bad:?}");
        }
        assert_eq!(header(br#"{"alg":"HS256","alg":"none"}"#), Err(Malformed));
    }

    #[test]
    fn anything_but_one_object_is_malformed() {
        for bad in [
            &b"[1]"[..],
            b"\"x\"",
            b"",
            b"{",
            b"{} {}",
            b"{\"a\":1}x",
            b"null",
        ] {
            assert_eq!(claims(bad, "w"), Err(Malformed), "{bad:?}");
        }
    }
}
