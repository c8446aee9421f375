//! Query-string decoding for `/v1/stream?token=...&workspace=...`.
//!
//! Values are percent-decoded (`+` as space, as browsers' `URLSearchParams` encode it), and
//! borrowed from the request when there is nothing to decode (a JWT never needs it), so reading
//! a query allocates nothing. The token is handled as opaque bytes and never formatted anywhere.

use std::borrow::Cow;

/// The stream's query parameters. The first occurrence of each wins, whatever it holds: a later
/// one never replaces it (a first `workspace` that is not UTF-8 stays "no workspace").
#[derive(Default)]
pub struct StreamQuery<'a> {
    /// The raw JWT, percent-decoded. Secret: never log or echo.
    pub token: Option<Cow<'a, [u8]>>,
    /// The requested workspace id, when present and UTF-8.
    pub workspace: Option<Cow<'a, str>>,
}

impl std::fmt::Debug for StreamQuery<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamQuery")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("workspace", &self.workspace)
            .finish()
    }
}

/// Parses the query part (after `?`) of a stream request.
pub fn parse_stream_query(query: &[u8]) -> StreamQuery<'_> {
    let mut q = StreamQuery::default();
    let (mut token_seen, mut workspace_seen) = (false, false);
    for pair in query.split(|&b| b == b'&') {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        match k {
            b"token" if !std::mem::replace(&mut token_seen, true) => {
                q.token = Some(percent_decode(v))
            }
            b"workspace" if !std::mem::replace(&mut workspace_seen, true) => {
                q.workspace = match percent_decode(v) {
                    Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
                    Cow::Owned(b) => String::from_utf8(b).ok().map(Cow::Owned),
                }
            }
            _ => {}
        }
    }
    q
}

/// Decodes `%XX` escapes and `+`; a malformed escape is kept literally. Borrows `input` when it
/// has neither.
pub fn percent_decode(input: &[u8]) -> Cow<'_, [u8]> {
    if !input.iter().any(|&b| b == b'%' || b == b'+') {
        // A JWT (base64url and dots) never needs decoding.
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' if i + 2 < input.len() => match (hex(input[i + 1]), hex(input[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_params() {
        let q = parse_stream_query(b"token=a.b.c&workspace=ws%5F01+x&token=other");
        assert_eq!(q.token.as_deref(), Some(&b"a.b.c"[..]));
        assert_eq!(q.workspace.as_deref(), Some("ws_01 x"));
        assert!(!format!("{q:?}").contains("a.b.c"));
    }

    #[test]
    fn the_first_occurrence_wins_even_when_it_is_unusable() {
        let q = parse_stream_query(b"workspace=%FF&workspace=ws_2&token=&token=t2");
        assert_eq!(q.workspace, None);
        assert_eq!(q.token.as_deref(), Some(&b""[..]));
        let q = parse_stream_query(b"workspace=ws_1&workspace=ws_2");
        assert_eq!(q.workspace.as_deref(), Some("ws_1"));
    }

    #[test]
    fn malformed_escapes_stay_literal() {
        assert_eq!(&*percent_decode(b"%"), b"%");
        assert_eq!(&*percent_decode(b"%4"), b"%4");
        assert_eq!(&*percent_decode(b"%zz"), b"%zz");
        assert_eq!(&*percent_decode(b"a%41"), b"aA");
        assert!(matches!(percent_decode(b"a.b_c-d"), Cow::Borrowed(_)));
    }
}
