//! Small JSON helpers that the encoders share: string escaping, a nesting-depth pre-check and a
//! whitespace minifier for already-validated documents.
//!
//! These run on bytes only. `minify` assumes its input is valid JSON (the caller validated it);
//! on anything else it still terminates and never panics, it just produces garbage out.

/// Appends `s` to `out` as a JSON string literal, quotes included.
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 15) as usize],
                ]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The length [`write_string`] writes for `s`, quotes included.
pub fn string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The deepest nesting of arrays and objects in `input`, counting only brackets outside strings.
///
/// Cheap enough to run before a recursive parser so that hostile input cannot exhaust the stack.
pub fn max_depth(input: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in input {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Appends `input` to `out` without the insignificant whitespace between tokens.
pub fn minify_into(out: &mut Vec<u8>, input: &[u8]) {
    let (mut in_str, mut escaped) = (false, false);
    for &b in input {
        if in_str {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b' ' | b'\n' | b'\r' | b'\t' => {}
            b'"' => {
                in_str = true;
                out.push(b);
            }
            _ => out.push(b),
        }
    }
}

/// The length [`minify_into`] would write for `input`, without writing it.
pub fn minified_len(input: &[u8]) -> usize {
    let (mut in_str, mut escaped, mut n) = (false, false, 0);
    for &b in input {
        if in_str {
            n += 1;
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b' ' | b'\n' | b'\r' | b'\t' => {}
            b'"' => {
                in_str = true;
                n += 1;
            }
            _ => n += 1,
        }
    }
    n
}

/// Why a valid JSON document would not read the same everywhere (RFC 8259 sections 6 and 8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotPortable {
    /// A number outside the IEEE 754 double range (`1e400`): JavaScript reads `Infinity`, many
    /// parsers (serde_json among them) refuse the whole document.
    NumberOutOfRange,
    /// A `\\u` escape of half a surrogate pair without its other half: some parsers refuse it,
    /// others produce a string that is not valid Unicode.
    LoneSurrogate,
}

/// Checks that `input` (valid JSON) reads the same in every parser: every number within the
/// double range and every surrogate escape paired. One pass; a number is converted only when
/// it has an exponent or over 300 characters.
pub fn portable(input: &[u8]) -> Result<(), NotPortable> {
    let (mut in_str, mut escaped) = (false, false);
    // Inside a string: the last escape was a high surrogate, so a low one must follow at once.
    let mut want_low = false;
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if in_str {
            if escaped {
                escaped = false;
                if b == b'u' {
                    let unit = input
                        .get(i + 1..i + 5)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                        .unwrap_or(0);
                    let high = (0xD800..0xDC00).contains(&unit);
                    let low = (0xDC00..0xE000).contains(&unit);
                    if low != want_low {
                        return Err(NotPortable::LoneSurrogate);
                    }
                    want_low = high;
                    i += 5;
                    continue;
                }
                if want_low {
                    return Err(NotPortable::LoneSurrogate);
                }
            } else if b == b'\\' {
                escaped = true;
            } else if want_low {
                return Err(NotPortable::LoneSurrogate);
            } else if b == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < input.len()
                    && matches!(input[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let token = &input[start..i];
                if token.len() > 300 || token.iter().any(|&c| c == b'e' || c == b'E') {
                    let finite = std::str::from_utf8(token)
                        .ok()
                        .and_then(|t| t.parse::<f64>().ok())
                        .is_some_and(f64::is_finite);
                    if !finite {
                        return Err(NotPortable::NumberOutOfRange);
                    }
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// A key that appears twice in one JSON object (named, cut to 64 characters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicateKey(pub String);

impl std::fmt::Display for DuplicateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "duplicate key {:?}", self.0)
    }
}

/// Checks that no object in `input` (valid JSON) has the same key twice. Parsers disagree on
/// which of two values wins (serde_json and most JavaScript engines keep the last, some keep the
/// first), so a document with duplicates could mean one thing here and another to a subscriber
/// or an issuer: it is refused instead. Keys are compared after unescaping (`"a"` and
/// `"\u0061"` are the same key). One pass with serde_json, no tree built.
pub fn unique_keys(input: &[u8]) -> Result<(), DuplicateKey> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(input);
    // Recursion is bounded by the depth pre-checks every caller makes (and serde_json's own
    // limit of 128).
    UniqueKeys.deserialize(&mut de).map_err(|e| {
        let text = e.to_string();
        match text.strip_prefix(DUPLICATE_PREFIX) {
            Some(key) => DuplicateKey(key.split(" at line ").next().unwrap_or(key).to_string()),
            // Not valid JSON: callers validate first, so this is not a duplicate.
            None => DuplicateKey(String::new()),
        }
    })
}

const DUPLICATE_PREFIX: &str = "duplicate key: ";

/// A `serde` seed that walks any JSON value and fails on the first object with a repeated key.
/// The JWT claims reader uses it for the values it does not interpret.
pub struct UniqueKeys;

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(UniqueKeys)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = KeySet::default();
        while let Some(key) = map.next_key_seed(Key)? {
            keys.insert(key)?;
            map.next_value_seed(UniqueKeys)?;
        }
        Ok(())
    }
}

/// Keys of one object kept in a fixed array before a hash set takes over.
const FEW_KEYS: usize = 16;

/// The keys of one object seen so far: a short list in place (objects usually have a handful
/// of keys, so checking them allocates nothing), a hash set past it.
pub struct KeySet<'de> {
    few: [std::borrow::Cow<'de, str>; FEW_KEYS],
    len: usize,
    many: std::collections::HashSet<std::borrow::Cow<'de, str>>,
}

impl Default for KeySet<'_> {
    fn default() -> Self {
        KeySet {
            few: std::array::from_fn(|_| std::borrow::Cow::Borrowed("")),
            len: 0,
            many: std::collections::HashSet::new(),
        }
    }
}

impl<'de> KeySet<'de> {
    /// Adds `key`; an error naming it if it was there already.
    pub fn insert<E: serde::de::Error>(
        &mut self,
        key: std::borrow::Cow<'de, str>,
    ) -> Result<(), E> {
        let seen = if self.many.is_empty() {
            self.few[..self.len].contains(&key)
        } else {
            self.many.contains(&key)
        };
        if seen {
            let shown: String = key.chars().take(64).collect();
            return Err(E::custom(format_args!("{DUPLICATE_PREFIX}{shown}")));
        }
        if self.len < FEW_KEYS {
            self.few[self.len] = key;
            self.len += 1;
        } else {
            if self.many.is_empty() {
                self.many.extend(self.few.iter_mut().map(std::mem::take));
            }
            self.many.insert(key);
        }
        Ok(())
    }
}

/// An object key, borrowed from the input when it has no escapes.
pub struct Key;

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_outside_the_double_range_are_found() {
        let out = Err(NotPortable::NumberOutOfRange);
        assert_eq!(
            portable(br#"{"a":[1,-2.5e10,1e308,0.1e-400,"1e999"]}"#),
            Ok(())
        );
        assert_eq!(portable(br#"{"a":1e309}"#), out);
        assert_eq!(portable(br#"{"a":[0,-2.5E311111]}"#), out);
        let long = format!(r#"{{"a":{}}}"#, "9".repeat(400));
        assert_eq!(portable(long.as_bytes()), out);
        let fine = format!(r#"{{"a":{}}}"#, "9".repeat(300));
        assert_eq!(portable(fine.as_bytes()), Ok(()));
        assert_eq!(portable(br#"{"s":"a\"1e999"}"#), Ok(()));
    }

    #[test]
    fn surrogate_escapes_must_pair() {
        let lone = Err(NotPortable::LoneSurrogate);
        assert_eq!(portable(br#"{"s":"\ud83d\ude00 \u00e9 \\ud83d"}"#), Ok(()));
        assert_eq!(portable(br#"{"s":"\ud83d"}"#), lone);
        assert_eq!(portable(br#"{"s":"\ude00"}"#), lone);
        assert_eq!(portable(br#"{"s":"\ud83dx"}"#), lone);
        assert_eq!(portable(br#"{"s":"\ud83d\n"}"#), lone);
        assert_eq!(portable(br#"{"s":"\ud83d\ud83d"}"#), lone);
        assert_eq!(portable(br#"{"\uDDDD":1}"#), lone);
    }

    #[test]
    fn escapes_like_serde_json() {
        for s in [
            "plain",
            "quo\"te",
            "back\\slash",
            "nl\n\r\t",
            "\u{1}\u{1f}\u{8}\u{c}",
            "ünï©ode ✓",
            "",
        ] {
            let mut out = Vec::new();
            write_string(&mut out, s);
            assert_eq!(string_len(s), out.len(), "{s:?}");
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn duplicate_keys_are_found_at_any_depth_after_unescaping() {
        assert_eq!(
            unique_keys(br#"{"a":1,"b":{"a":2},"c":[{"a":1},{"a":2}]}"#),
            Ok(())
        );
        let dup = |s: &str| unique_keys(s.as_bytes()).unwrap_err().0;
        assert_eq!(dup(r#"{"a":1,"a":2}"#), "a");
        assert_eq!(dup(r#"{"x":{"k":1,"k":null}}"#), "k");
        assert_eq!(dup(r#"[1,{"z":[{"q":1,"\u0071":2}]}]"#), "q");
        assert_eq!(dup(r#"{"\n":1,"\u000a":2}"#), "\n");
        // Many keys: the hash set takes over past the short list.
        let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        assert_eq!(
            unique_keys(format!("{{{}}}", many.join(",")).as_bytes()),
            Ok(())
        );
        assert_eq!(dup(&format!(r#"{{{},"k3":0}}"#, many.join(","))), "k3");
        // At the seam between the list and the set.
        for n in [15, 16, 17] {
            let keys = many[..n].join(",");
            let last = n - 1;
            assert_eq!(
                dup(&format!(r#"{{{keys},"k{last}":0}}"#)),
                format!("k{last}")
            );
            assert_eq!(dup(&format!(r#"{{{keys},"k0":0}}"#)), "k0");
        }
        assert_eq!(unique_keys(b"[]"), Ok(()));
        assert_eq!(unique_keys(b"\"x\""), Ok(()));
    }

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(max_depth(br#"{"a":[1,{"b":"[[[{{"}]}"#), 3);
        assert_eq!(max_depth(br#""\"[""#), 0);
        assert_eq!(max_depth(b"[[[[]]]]"), 4);
    }

    #[test]
    fn minify_keeps_strings_intact() {
        let mut out = Vec::new();
        minify_into(
            &mut out,
            b"{ \"a b\" : [ 1 , \"x\\\" y\" ],\n\t\"c\":null }",
        );
        assert_eq!(out, b"{\"a b\":[1,\"x\\\" y\"],\"c\":null}");
        let input = b"{ \"a b\" : [ 1 , \"x\\\" y\" ],\n\t\"c\":null }";
        assert_eq!(minified_len(input), out.len());
    }
}
