//! `permessage-deflate` negotiation (RFC 7692) from a client's `Sec-WebSocket-Extensions`
//! headers, as a pure function: which offer the server takes, and what it answers.
//!
//! The server compresses each event frame once for every subscriber, so every compressed frame
//! must stand alone: it always answers `server_no_context_takeover`. It never asks for
//! `client_no_context_takeover` (Safari fails the connection when a server does), and it does
//! not cap the client's window (`client_max_window_bits`): a client's compressed messages are
//! inflated with whatever window it uses (its offer's value, else 15), only counted against the
//! message bound, and a connection holds an inflater only once it sends one.
//!
//! An offer is taken only if it is well formed (RFC 7692 §7.1): known parameters, each at most
//! once, `no_context_takeover` without a value, `max_window_bits` values 8 to 15 (plain or
//! quoted). One asking the server for a window below 15 (`server_max_window_bits`) is declined,
//! since the one compressor is shared by every connection. A declined offer is skipped and the
//! next one considered, as the RFC asks; nothing in these headers fails the handshake.

/// The extension's name.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The answer's header line when an offer is taken (CRLF included).
pub const RESPONSE_HEADER: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n";

/// An offer the server took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The LZ77 window the client compresses with (`client_max_window_bits` is not answered, so
    /// the client may use up to 15): what inflating its frames needs.
    pub client_window_bits: u8,
    /// The client offered `client_no_context_takeover`: its frames stand alone too (the
    /// server's inflater may be reset between them).
    pub client_no_context_takeover: bool,
}

/// The first acceptable `permessage-deflate` offer among `headers` (the values of every
/// `Sec-WebSocket-Extensions` header, in order), or `None`.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreed> {
    for value in headers {
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        for offer in split_outside_quotes(value, ',') {
            if let Some(agreed) = offer_of(offer) {
                return Some(agreed);
            }
        }
    }
    None
}

/// One offer (`name; param; param=value ...`), if it is `permessage-deflate` and acceptable.
fn offer_of(offer: &str) -> Option<Agreed> {
    let mut parts = split_outside_quotes(offer, ';');
    let name = parts.next()?.trim();
    if !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
        return None;
    }
    let mut seen = [false; 4];
    let mut agreed = Agreed {
        client_window_bits: 15,
        client_no_context_takeover: false,
    };
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        let index = match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None, // an unknown parameter: declined
        };
        if std::mem::replace(&mut seen[index], true) {
            return None; // a parameter twice: declined
        }
        match (index, value) {
            (0, None) => {}
            (1, None) => agreed.client_no_context_takeover = true,
            (2, Some(v)) => {
                // The shared compressor uses the full window: a smaller one is declined.
                if window_bits(v)? != 15 {
                    return None;
                }
            }
            // Without a value: the client can be told a limit; none is asked for.
            (3, None) => {}
            (3, Some(v)) => agreed.client_window_bits = window_bits(v)?,
            _ => return None, // a value where none belongs, or none where one must be
        }
    }
    Some(agreed)
}

/// A `max_window_bits` value: 8 to 15, digits only, no leading zero.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u8 = v.parse().ok()?;
    (8..=15).contains(&n).then_some(n)
}

/// A token or a quoted string's content (no escapes are needed in the values this extension
/// defines, so one is refused).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            (!inner.contains(['"', '\\'])).then_some(inner)
        }
        None => (!v.contains(['"', '\\']) && !v.is_empty()).then_some(v),
    }
}

/// Splits at `sep` outside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut quoted = false;
    let mut parts = Vec::new();
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(h: &str) -> Option<Agreed> {
        negotiate([h.as_bytes()])
    }

    const PLAIN: Agreed = Agreed {
        client_window_bits: 15,
        client_no_context_takeover: false,
    };

    #[test]
    fn what_browsers_offer_is_taken() {
        // Chrome and Firefox.
        assert_eq!(
            one("permessage-deflate; client_max_window_bits"),
            Some(PLAIN)
        );
        // Safari.
        assert_eq!(one("permessage-deflate"), Some(PLAIN));
        // Node's ws, and case and spacing that do not matter.
        assert_eq!(
            one("Permessage-Deflate ;Client_Max_Window_Bits=10 ; server_no_context_takeover"),
            Some(Agreed {
                client_window_bits: 10,
                client_no_context_takeover: false
            })
        );
        assert_eq!(
            one(r#"permessage-deflate; client_no_context_takeover; client_max_window_bits="9""#),
            Some(Agreed {
                client_window_bits: 9,
                client_no_context_takeover: true
            })
        );
        assert_eq!(
            one("permessage-deflate; server_max_window_bits=15"),
            Some(PLAIN)
        );
    }

    #[test]
    fn a_bad_offer_is_declined_and_the_next_one_considered() {
        for bad in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; client_max_window_bits=\"1\\0\"",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; x-webkit-unknown",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(one(bad), None, "{bad:?}");
            let then_good = format!("{bad}, permessage-deflate");
            assert_eq!(one(&then_good), Some(PLAIN), "{then_good:?}");
        }
        // Across header lines too, and a line that is not UTF-8 is skipped.
        assert_eq!(
            negotiate([
                b"foo".as_slice(),
                b"\xff\xfe".as_slice(),
                b"permessage-deflate; client_max_window_bits=12".as_slice()
            ]),
            Some(Agreed {
                client_window_bits: 12,
                client_no_context_takeover: false
            })
        );
        assert_eq!(negotiate(std::iter::empty::<&[u8]>()), None);
    }

    #[test]
    fn quotes_keep_separators_inside_a_value() {
        // An unterminated quote runs to the end of the header: nothing after it is an offer.
        assert_eq!(
            one(r#"permessage-deflate; client_max_window_bits="10, permessage-deflate"#),
            None
        );
        // A quoted comma does not split offers (the value is then refused, not mis-split).
        assert_eq!(
            one(r#"permessage-deflate; client_max_window_bits="1,5""#),
            None
        );
        assert_eq!(
            one(r#"permessage-deflate; client_max_window_bits="1;5", permessage-deflate"#),
            Some(PLAIN)
        );
    }
}
