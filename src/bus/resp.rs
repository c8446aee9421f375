//! RESP2, the Redis protocol, as far as a pub/sub bus needs it: commands out, replies and
//! pushed messages in.
//!
//! Commands are arrays of bulk strings, written into a caller's buffer. Replies are parsed
//! incrementally from the front of a buffer that may hold a partial reply ([`parse`] returns
//! `Ok(None)` until the whole reply is there), and every length Redis announces is checked
//! against a bound before anything is allocated for it: a broken or hostile peer cannot make the
//! server reserve more than `max_bulk` bytes or nest arrays deeper than [`MAX_DEPTH`].

use std::fmt;

/// Deepest array nesting accepted in a reply (pub/sub replies nest one level).
pub const MAX_DEPTH: usize = 4;
/// Most elements accepted in one array reply.
pub const MAX_ARRAY: i64 = 1 << 16;

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR …`
    Error(Vec<u8>),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc` (`None`: the null bulk string `$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n…` (`None`: the null array `*-1`).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The bytes of a simple or bulk string reply.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Simple(b) | Reply::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }
}

/// Why a reply stream cannot be read. Either way the connection is unusable and is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RespError {
    /// Not RESP2 (an unknown type byte, a bad length, a missing CRLF).
    Protocol(&'static str),
    /// A bulk string or array over the bound.
    TooLarge(i64),
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::Protocol(why) => write!(f, "not a RESP2 reply: {why}"),
            RespError::TooLarge(n) => write!(f, "reply element of {n} over the bound"),
        }
    }
}

impl std::error::Error for RespError {}

/// Appends one command (an array of bulk strings) to `out`.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`: `Ok(Some((reply, bytes used)))`, `Ok(None)` if the
/// reply is not complete yet. Bulk strings over `max_bulk` bytes are refused from their header.
pub fn parse(buf: &[u8], max_bulk: usize) -> Result<Option<(Reply, usize)>, RespError> {
    let mut pos = 0;
    match parse_at(buf, &mut pos, max_bulk, 0)? {
        Some(r) => Ok(Some((r, pos))),
        None => Ok(None),
    }
}

/// The line starting at `*pos` without its CRLF, advancing `*pos` past it.
fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Result<Option<&'a [u8]>, RespError> {
    let rest = &buf[*pos..];
    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
        // A line is a type byte and a number or a short status: bound it while it is partial.
        return if rest.len() > 64 * 1024 {
            Err(RespError::Protocol("line without an end"))
        } else {
            Ok(None)
        };
    };
    if lf == 0 || rest[lf - 1] != b'\r' {
        return Err(RespError::Protocol("line not ended by CRLF"));
    }
    *pos += lf + 1;
    Ok(Some(&rest[..lf - 1]))
}

fn number(digits: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError::Protocol("bad number"))
}

fn parse_at(
    buf: &[u8],
    pos: &mut usize,
    max_bulk: usize,
    depth: usize,
) -> Result<Option<Reply>, RespError> {
    let start = *pos;
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    *pos += 1;
    let Some(text) = line(buf, pos)? else {
        *pos = start;
        return Ok(None);
    };
    let reply = match kind {
        b'+' => Reply::Simple(text.to_vec()),
        b'-' => Reply::Error(text.to_vec()),
        b':' => Reply::Integer(number(text)?),
        b'$' => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some(Reply::Bulk(None)));
            }
            if n < 0 {
                return Err(RespError::Protocol("negative length"));
            }
            if n as u64 > max_bulk as u64 {
                return Err(RespError::TooLarge(n));
            }
            let n = n as usize;
            if buf.len() - *pos < n + 2 {
                *pos = start;
                return Ok(None);
            }
            if &buf[*pos + n..*pos + n + 2] != b"\r\n" {
                return Err(RespError::Protocol("bulk string not ended by CRLF"));
            }
            let data = buf[*pos..*pos + n].to_vec();
            *pos += n + 2;
            Reply::Bulk(Some(data))
        }
        b'*' => {
            let n = number(text)?;
            if n == -1 {
                return Ok(Some(Reply::Array(None)));
            }
            if n < 0 {
                return Err(RespError::Protocol("negative length"));
            }
            if n > MAX_ARRAY {
                return Err(RespError::TooLarge(n));
            }
            if depth >= MAX_DEPTH {
                return Err(RespError::Protocol("arrays nested too deeply"));
            }
            let mut items = Vec::with_capacity((n as usize).min(16));
            for _ in 0..n {
                match parse_at(buf, pos, max_bulk, depth + 1)? {
                    Some(r) => items.push(r),
                    None => {
                        *pos = start;
                        return Ok(None);
                    }
                }
            }
            Reply::Array(Some(items))
        }
        _ => return Err(RespError::Protocol("unknown reply type")),
    };
    Ok(Some(reply))
}

/// A message delivered on a subscribed channel, borrowed from its reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// The channel it was published on.
    pub channel: &'a [u8],
    /// What was published.
    pub payload: &'a [u8],
}

/// Where a pub/sub message lies in a buffer: its channel's and its payload's byte ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageAt {
    /// The channel's bytes.
    pub channel: std::ops::Range<usize>,
    /// The payload's bytes.
    pub payload: std::ops::Range<usize>,
}

/// If the front of `buf` is a complete pub/sub message (`*3`, then `message` or `smessage`,
/// channel and payload as bulk strings, none over `max_bulk`), where its parts lie and how many
/// bytes it takes; otherwise `None`, and [`parse`] reads it (anything else, a message cut
/// short, or one it refuses). The message is read in place: nothing is copied or allocated, so
/// the frame built from it is the payload's only copy.
pub fn message_at(buf: &[u8], max_bulk: usize) -> Option<(MessageAt, usize)> {
    /// The bulk string at `pos`: its range, and the position after it.
    fn bulk(buf: &[u8], pos: usize, max_bulk: usize) -> Option<(std::ops::Range<usize>, usize)> {
        let rest = buf.get(pos..)?.strip_prefix(b"$")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 19 {
            return None;
        }
        let len: usize = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        if len > max_bulk {
            return None;
        }
        let start = pos + 1 + digits + 2;
        if buf.get(pos + 1 + digits..start)? != b"\r\n" {
            return None;
        }
        let end = start.checked_add(len)?;
        if buf.get(end..end + 2)? != b"\r\n" {
            return None;
        }
        Some((start..end, end + 2))
    }
    let rest = buf.strip_prefix(b"*3\r\n")?;
    let pos = buf.len() - rest.len();
    let (kind, pos) = bulk(buf, pos, max_bulk)?;
    if !matches!(&buf[kind], b"message" | b"smessage") {
        return None;
    }
    let (channel, pos) = bulk(buf, pos, max_bulk)?;
    let (payload, pos) = bulk(buf, pos, max_bulk)?;
    Some((MessageAt { channel, payload }, pos))
}

/// The message a pub/sub reply carries, if it is one (`message` from `SUBSCRIBE`, `smessage`
/// from `SSUBSCRIBE`); subscription confirmations and other replies give `None`.
pub fn pubsub_message(reply: &Reply) -> Option<Message<'_>> {
    let Reply::Array(Some(items)) = reply else {
        return None;
    };
    match items.as_slice() {
        [kind, channel, payload]
            if matches!(kind.as_bytes(), Some(b"message") | Some(b"smessage")) =>
        {
            Some(Message {
                channel: channel.as_bytes()?,
                payload: payload.as_bytes()?,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_found_in_place_exactly_where_parse_finds_it() {
        let wire = b"*3\r\n$8\r\nsmessage\r\n$3\r\nch1\r\n$5\r\nhello\r\n:1\r\n";
        let (at, used) = message_at(wire, 64).expect("a message");
        let (reply, parsed) = parse(wire, 64).unwrap().unwrap();
        assert_eq!(used, parsed);
        let m = pubsub_message(&reply).unwrap();
        assert_eq!(&wire[at.channel], m.channel);
        assert_eq!(&wire[at.payload], m.payload);
        // Cut short anywhere, or over the bound, or not a message: left to `parse`.
        for cut in 0..used {
            assert_eq!(message_at(&wire[..cut], 64), None, "cut at {cut}");
        }
        assert_eq!(message_at(wire, 4), None);
        assert_eq!(
            message_at(b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n", 64),
            None
        );
        assert_eq!(
            message_at(b"*3\r\n$7\r\nmessage\r\n$-1\r\n$1\r\nx\r\n", 64),
            None
        );
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, &[b"PUBLISH", b"causeloop:v1:ws_1", b"{}"]);
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$17\r\ncauseloop:v1:ws_1\r\n$2\r\n{}\r\n"
        );
    }

    #[test]
    fn every_reply_type_and_partial_input() {
        let stream: &[u8] =
            b"+OK\r\n-ERR nope\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\na\r\n:1\r\n*-1\r\n";
        let want = [
            Reply::Simple(b"OK".to_vec()),
            Reply::Error(b"ERR nope".to_vec()),
            Reply::Integer(42),
            Reply::Bulk(Some(b"abc".to_vec())),
            Reply::Bulk(None),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"a".to_vec())),
                Reply::Integer(1),
            ])),
            Reply::Array(None),
        ];
        // Whole, and then cut at every byte: a partial reply is never half-consumed.
        let mut pos = 0;
        for w in &want {
            let (r, used) = parse(&stream[pos..], 1024).unwrap().unwrap();
            assert_eq!(&r, w);
            for cut in 0..used {
                assert_eq!(parse(&stream[pos..pos + cut], 1024).unwrap(), None);
            }
            pos += used;
        }
        assert_eq!(pos, stream.len());
    }

    #[test]
    fn bounds_are_checked_before_allocating() {
        assert_eq!(
            parse(b"$1000000000\r\n", 1 << 20),
            Err(RespError::TooLarge(1_000_000_000))
        );
        assert_eq!(
            parse(b"*99999999\r\n", 1 << 20),
            Err(RespError::TooLarge(99_999_999))
        );
        assert!(parse(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", 1024).is_err());
        assert!(parse(b"?x\r\n", 1024).is_err());
        assert!(parse(b"$3\r\nabcd\r\n", 1024).is_err());
        assert!(parse(b":12\n", 1024).is_err());
        assert!(parse(&[b'+'; 70_000], 1024).is_err());
    }

    #[test]
    fn pubsub_messages_are_recognised() {
        let (r, _) = parse(
            b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$5\r\nhello\r\n",
            1024,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            pubsub_message(&r),
            Some(Message {
                channel: b"chan",
                payload: b"hello"
            })
        );
        let (s, _) = parse(b"*3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$1\r\np\r\n", 1024)
            .unwrap()
            .unwrap();
        assert!(pubsub_message(&s).is_some());
        let (confirm, _) = parse(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(pubsub_message(&confirm), None);
    }
}
