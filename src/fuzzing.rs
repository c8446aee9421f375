//! Entry points for the fuzz targets in `fuzz/`, one per parser that reads network or operator
//! input. Each runs the code on arbitrary bytes and panics if an invariant breaks; a panic is a
//! finding. `tests/fuzz_corpus.rs` replays every committed corpus and crash case through the
//! same functions on every `cargo test`, so a fixed finding stays fixed.
//!
//! Not part of the server's API; public only so that the fuzz crate and the tests can reach it.

use crate::auth::jwt::{self, Validation};
use crate::auth::keys::{self, KeySet};
use crate::bus::body::{self, BodyLimits};
use crate::bus::topology::{self, Topology, SLOTS};
use crate::bus::{resp, wire};
use crate::config::RedisNode;
use crate::config::Secret;
use crate::event::{encode_with, id_ok};
use crate::http::query::parse_stream_query;
use crate::http::request::{parse_head, route_public};
use crate::ws::decoder::Decoder;

/// The HS256 secret the JWT target signs its generated tokens with.
pub const FUZZ_SECRET: &[u8] = b"fuzz-secret-0123456789abcdef0123456789";

/// The request-head parser and the public router: never panic; a parsed head lies within the
/// input and the bound.
pub fn http_head(data: &[u8]) {
    const MAX: usize = 8192;
    match parse_head(data, MAX, 64) {
        Ok(Some(head)) => {
            assert!(head.len <= data.len() && head.len <= MAX);
            let _ = route_public(&head);
            let _ = parse_stream_query(head.query);
        }
        Ok(None) => assert!(data.len() < MAX, "a partial head past the bound"),
        Err(_) => {}
    }
}

/// The client-frame decoder, fed in pieces cut where the first byte says, with
/// `permessage-deflate` negotiated when that byte is odd: never panics, never buffers more than
/// one frame header and one control payload, and every compressed message it hands on is
/// inflated by a connection's inflater within the bound (or refused) without a panic.
pub fn client_frames(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut >> 1).max(1);
    let deflate = cut & 1 == 1;
    let mut d = Decoder::default();
    let mut pending = Vec::new();
    let mut inflater = crate::ws::deflate::Inflater::new(15, false);
    let mut refused = false;
    for chunk in rest.chunks(step) {
        let r = d.feed_with(&mut pending, chunk, 4096, deflate, &mut |c| {
            use crate::ws::decoder::Control;
            let r = match c {
                Control::CompressedFrame { mask, len, fin } if !refused => {
                    assert!(deflate, "a compressed frame without the extension");
                    inflater.frame(mask, len, fin, 4096)
                }
                Control::Compressed(masked) if !refused => inflater.bytes(masked, 4096),
                _ => Ok(false),
            };
            refused |= r.is_err();
        });
        assert!(
            pending.len() <= 14 + 125,
            "decoder buffered {}",
            pending.len()
        );
        if r.is_err() || refused {
            return;
        }
    }
}

/// Acknowledgement pongs: the rest of the input is a client's byte stream (masked frames, cut
/// where the first byte says); every pong's payload is read as an acknowledgement claim by a
/// connection that was sent up to offset 1,000 of epoch 7 and had acknowledged offset 10. A
/// payload that parses writes back to itself; a claim is taken only if it is of that epoch,
/// not beyond what was sent and past the last acknowledgement; nothing else moves the state.
pub fn ack_pong(data: &[u8]) {
    use crate::history::ack::{self, AckState};
    use crate::history::Position;
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let sent = Position {
        epoch: 7,
        offset: 1000,
    };
    let mut state = AckState::starting_at(Position {
        epoch: 7,
        offset: 10,
    });
    state.sent = sent;
    let mut d = Decoder::default();
    let mut pending = Vec::new();
    let mut claims = Vec::new();
    for chunk in rest.chunks(usize::from(cut).max(1)) {
        let r = d.feed(&mut pending, chunk, 4096, &mut |c| {
            if let crate::ws::decoder::Control::Pong(p) = c {
                if let Some(pos) = ack::parse(p) {
                    assert_eq!(&ack::payload(pos)[..], p, "a parsed payload writes back");
                    claims.push(pos);
                }
            }
        });
        if r.is_err() {
            break;
        }
    }
    // The raw input as one payload, too (the parser sees arbitrary bytes, not only frames).
    if let Some(pos) = ack::parse(rest) {
        assert_eq!(&ack::payload(pos)[..], rest);
    }
    for claim in claims {
        let before = state;
        let took = state.on_pong(claim);
        assert_eq!(state.sent, sent);
        if took {
            assert_eq!(state.acked, claim);
            assert!(claim.epoch == 7 && claim.offset <= 1000 && claim.offset > before.acked.offset);
        } else {
            assert_eq!(state, before);
        }
    }
}

/// JWT verification. With a first byte below 128 the rest is a token as a client would send it
/// (it must not verify: nobody but the test knows the secret). Otherwise the rest is
/// `header NUL claims`, signed here with [`FUZZ_SECRET`] so that the header and claim checks are
/// reached; anything that verifies must carry ids that pass the id rule and an unexpired `exp`.
pub fn jwt_verify(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = keys::from_secrets(&[Secret::from(FUZZ_SECRET.to_vec())]);
    let rules = Validation::default();
    let now = 1_800_000_000;
    let mut buf = Vec::new();
    if mode < 128 {
        assert!(jwt::verify(rest, &keys, &rules, now, &mut buf).is_err());
        return;
    }
    let Some(split) = rest.iter().position(|&b| b == 0) else {
        return;
    };
    let token = jwt::sign_hs256_with_header(FUZZ_SECRET, &rest[..split], &rest[split + 1..]);
    if let Ok(id) = jwt::verify(token.as_bytes(), &keys, &rules, now, &mut buf) {
        assert!(id_ok(&id.user_id, rules.max_id_bytes));
        assert!(id_ok(&id.workspace_id, rules.max_id_bytes));
        assert!(id.exp + rules.leeway_secs > now);
    }
}

/// JWKS parsing: never panics, whatever the document.
pub fn jwks(data: &[u8]) {
    let mut set = KeySet::default();
    let _ = set.add_jwks(&mut data.to_vec());
}

/// Publish-body validation and event encoding: an accepted body's events pass every rule, and the
/// frame built from each is valid JSON whose payload means what the publisher sent.
pub fn publish_body(data: &[u8]) {
    let limits = BodyLimits {
        max_items: 64,
        max_depth: 8,
        max_id_bytes: 64,
    };
    let Ok(specs) = body::parse(data, limits) else {
        return;
    };
    assert!(specs.len() <= limits.max_items);
    for spec in specs {
        assert!(id_ok(&spec.workspace_id, limits.max_id_bytes));
        if let Some(u) = &spec.user_id {
            assert!(id_ok(u, limits.max_id_bytes));
        }
        assert!(crate::json::max_depth(spec.payload.as_bytes()) <= limits.max_depth);
        let frame = encode_with(&spec.kind, spec.payload.len(), 1_800_000_000_000, |buf| {
            crate::json::minify_into(buf, spec.payload.as_bytes())
        });
        // A server frame's header: 2 bytes, or 4 or 10 when the second byte says so.
        let header = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let text = std::str::from_utf8(&frame[header..]).expect("frames are UTF-8");
        let v: serde_json::Value = serde_json::from_str(text).expect("the frame is JSON");
        let sent: serde_json::Value = serde_json::from_str(spec.payload).expect("payload is JSON");
        assert_eq!(v["payload"], sent, "minifying changed the payload");
        assert_eq!(v["type"].as_str(), Some(&*spec.kind));
    }
}

/// The RESP2 reply parser (replies come from Redis, which the server does not control): never
/// panics, never claims more bytes than it was given, and parses the same reply whole or with
/// bytes still to come. The in-place reader of pub/sub messages finds a message only where the
/// parser finds the same one, in the same bytes.
pub fn resp_reply(data: &[u8]) {
    let in_place = resp::message_at(data, 4096);
    let parsed = resp::parse(data, 4096);
    if let Some((at, used)) = &in_place {
        let Ok(Some((reply, n))) = &parsed else {
            panic!("message_at found a message that parse does not: {parsed:?}");
        };
        assert_eq!(used, n);
        let m = resp::pubsub_message(reply).expect("parse sees a pub/sub message too");
        assert_eq!(&data[at.channel.clone()], m.channel);
        assert_eq!(&data[at.payload.clone()], m.payload);
    }
    let Ok(Some((reply, used))) = parsed else {
        return;
    };
    assert!(used <= data.len());
    assert_eq!(
        resp::parse(&data[..used], 4096),
        Ok(Some((reply.clone(), used)))
    );
    if used > 0 {
        assert_eq!(resp::parse(&data[..used - 1], 4096), Ok(None));
    }
    let _ = resp::pubsub_message(&reply);
}

/// A message received from Redis: accepted only if it meets the publish rules, and then its
/// frame is JSON whose payload means what the message carried.
pub fn wire_message(data: &[u8]) {
    let limits = wire::WireLimits {
        max_event_bytes: 64 << 10,
        max_depth: 8,
        max_id_bytes: 64,
    };
    let Ok(got) = wire::decode(data, limits) else {
        return;
    };
    assert!(got.frame.len() <= limits.max_event_bytes);
    let header = match got.frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let frame: serde_json::Value =
        serde_json::from_slice(&got.frame[header..]).expect("the frame is JSON");
    let sent: serde_json::Value = serde_json::from_slice(data).expect("the message is JSON");
    assert_eq!(frame["payload"], sent["payload"]);
    assert_eq!(frame["type"], sent["type"]);
    // Version 2 carries its position, version 1 none.
    match got.pos {
        Some(p) => {
            assert_eq!(sent["v"], 2);
            assert_eq!(sent["epoch"].as_u64(), Some(p.epoch));
            assert_eq!(sent["offset"].as_u64(), Some(p.offset));
            assert!(p.epoch > 0 && p.offset > 0);
        }
        None => assert_eq!(sent["v"], 1),
    }
}

/// A Redis Cluster layout (`CLUSTER SLOTS`) and a redirect (`MOVED`), both from Redis: never
/// panic; a layout read routes every channel to one of its own masters or to none, and a
/// redirect names a real slot and keeps the routing within the layout.
pub fn cluster_layout(data: &[u8]) {
    let asked = RedisNode {
        host: "seed".into(),
        port: 7000,
    };
    let channels: [&[u8]; 4] = [b"causeloop:v1:ws:a", b"causeloop:v1:ws:{x}y", b"", data];
    if let Ok(Some((reply, _))) = resp::parse(data, 4096) {
        if let Ok(mut t) = Topology::from_cluster_slots(&reply, &asked) {
            assert!(t.uncovered() <= SLOTS);
            assert_eq!(t.uncovered() == SLOTS, t.nodes.is_empty());
            for c in channels {
                assert!(t.node_for(c).map_or(true, |n| n < t.nodes.len()));
            }
            if let Some((slot, node)) = topology::redirect(data) {
                t.moved(slot, node.clone());
                let routed = t.node_for(b"causeloop:v1:ws:a");
                assert!(routed.map_or(true, |n| n < t.nodes.len()));
            }
            let again = Topology::from_cluster_slots(&reply, &asked).expect("same reply");
            assert!(again.changed_slots(&again).is_empty());
        }
    }
    if let Some((slot, _)) = topology::redirect(data) {
        assert!(usize::from(slot) < SLOTS);
    }
    for c in channels {
        assert!(usize::from(topology::slot(c)) < SLOTS);
    }
}

/// The cluster bus's subscription protocol, driven by arbitrary steps (interest gained and
/// lost, Redis running commands and answering, connections lost, slots moved) against a model
/// of Redis: the shards are never told a workspace is live while Redis holds no subscription
/// for it, and once every queue has run each wanted workspace is subscribed exactly once, at
/// its server, and nothing unwanted is kept. See
/// `causeloop_stream::bus::cluster::subscriptions::exercise`.
pub fn bus_subscriptions(data: &[u8]) {
    crate::bus::cluster::subscriptions::exercise(&data[..data.len().min(4096)]);
}

/// `Sec-WebSocket-Extensions` header values (one per line): the `permessage-deflate`
/// negotiation never panics, takes an offer only from a header that names the extension, with a
/// window the RFC allows, and decides the same way again.
pub fn ws_extensions(data: &[u8]) {
    let headers: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let agreed = crate::ws::extensions::negotiate(headers.iter().copied());
    assert_eq!(
        agreed,
        crate::ws::extensions::negotiate(headers.iter().copied())
    );
    if let Some(a) = agreed {
        assert!((8..=15).contains(&a.client_window_bits));
        assert!(headers.iter().any(|h| h
            .to_ascii_lowercase()
            .windows(crate::ws::extensions::PERMESSAGE_DEFLATE.len())
            .any(|w| w == crate::ws::extensions::PERMESSAGE_DEFLATE.as_bytes())));
    }
}

/// `permessage-deflate` on frames: any text payload the server compresses inflates back to
/// exactly itself, and inflating arbitrary bytes (a client's compressed message) never panics
/// and never produces more than the bound.
pub fn ws_deflate(data: &[u8]) {
    use crate::ws::deflate::{Deflater, InflateError, Inflater};
    use crate::ws::frame::{encode, header_len_of, OpCode};
    let plain = encode(OpCode::Text, data);
    if let Some(c) = Deflater::default().compress_frame(&plain, 1) {
        let body = &c[header_len_of(&c)..];
        assert!(body.len() < data.len());
        let back = Inflater::new(15, true).inflate_message(body, data.len());
        assert_eq!(back.as_deref(), Ok(data));
        if !data.is_empty() {
            let short = Inflater::new(15, true).inflate_message(body, data.len() - 1);
            assert_eq!(short, Err(InflateError::TooLarge));
        }
    }
    let max = 4096;
    if let Ok(out) = Inflater::new(15, false).inflate_message(data, max) {
        assert!(out.len() <= max);
    }
}

/// The PEM files a TLS fuzz target handshakes with (a fixture certificate and key, and the
/// authority that signed it): `tests/fixtures/tls/`.
pub struct TlsFixture {
    server: std::sync::Arc<rustls::ServerConfig>,
    client: std::sync::Arc<rustls::ClientConfig>,
}

impl TlsFixture {
    /// From the fixture's certificate chain, key and authority (PEM).
    #[allow(deprecated)] // ring, as src/tls.rs explains
    pub fn new(cert: &[u8], key: &[u8], ca: &[u8]) -> TlsFixture {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<_> = CertificateDer::pem_slice_iter(cert)
            .map(|c| c.expect("fixture certificate"))
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key).expect("fixture key");
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("fixture pair");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            roots.add(c.expect("fixture authority")).expect("a root");
        }
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsFixture {
            server: std::sync::Arc::new(server),
            client: std::sync::Arc::new(client),
        }
    }
}

/// Cuts `data` into pieces whose sizes the bytes of `sizes` give (1 to 256 each, cycling).
fn pieces<'a>(data: &'a [u8], sizes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = data;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |&b| usize::from(b) + 1);
        i += 1;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        Some(piece)
    })
}

/// The TLS edge of the public listener, through the shard's own TLS connection
/// (`shard::tls::TlsConn`). The first byte picks the mode and the second how input is cut; the
/// rest is the input.
///
/// - Even: the input is what a peer sends before any handshake (garbage, truncated or hostile
///   ClientHellos), in pieces: never panics, never yields plaintext, and what the connection
///   holds or wants to send stays bounded.
/// - Odd: a real client (rustls) handshakes with it in memory; the input is then the client's
///   request bytes, sent in pieces (records of every size) and fed to the server in other
///   pieces. The server's plaintext is exactly what was sent, in order, and the request-head
///   parser, fed as the shard feeds it, completes a head exactly when, and where, it does on
///   the whole, and refuses exactly what it refuses on the whole. The same input cut into
///   frames and flushed back through the connection's flush decrypts at the client to exactly
///   those frames.
pub fn tls_edge(fixture: &TlsFixture, data: &[u8]) {
    use crate::shard::tls::{TlsConn, TlsScratch};
    use std::io::{Read, Write};
    let [mode, cut, rest @ ..] = data else {
        return;
    };
    let sizes = std::slice::from_ref(cut);
    let mut server = TlsConn::new(fixture.server.clone()).expect("session");
    let mut scratch = TlsScratch::default();
    let mut plain = Vec::new();
    if mode & 1 == 0 {
        for piece in pieces(rest, sizes) {
            let mut piece = piece.to_vec();
            let r = server.receive(&mut piece, &mut plain);
            assert!(plain.is_empty(), "plaintext before a handshake");
            assert!(
                server.held_bytes() < 80 << 10,
                "{} bytes held",
                server.held_bytes()
            );
            if r.is_err() {
                return;
            }
        }
        return;
    }
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a name");
    let mut client = rustls::ClientConnection::new(fixture.client.clone(), name).expect("session");
    let mut empty = crate::shard::outbox::Outbox::default();
    while client.is_handshaking() || server.is_handshaking() {
        let mut wire = Vec::new();
        client.write_tls(&mut wire).expect("memory");
        server
            .receive(&mut wire, &mut plain)
            .expect("the fixture handshake");
        let mut back = Vec::new();
        server
            .flush(&mut empty, &mut back, &mut scratch)
            .expect("memory");
        client.read_tls(&mut &back[..]).expect("memory");
        client.process_new_packets().expect("the fixture handshake");
    }
    // The server's session tickets, if any, reach the client.
    let mut wire = Vec::new();
    server
        .flush(&mut empty, &mut wire, &mut scratch)
        .expect("memory");
    let mut input = &wire[..];
    while !input.is_empty() {
        client.read_tls(&mut input).expect("memory");
        client.process_new_packets().expect("tickets");
    }
    // Client to server: the request in pieces of the cut's size, each its own record(s).
    let mut wire = Vec::new();
    for piece in pieces(rest, sizes) {
        client.writer().write_all(piece).expect("memory");
        client.write_tls(&mut wire).expect("memory");
    }
    let (max, max_headers): (usize, usize) = (256, 16);
    let mut head_buf: Vec<u8> = Vec::new();
    let mut head_answer = None;
    let mut got = Vec::new();
    for piece in wire.chunks(usize::from(*cut).max(1)) {
        plain.clear();
        server
            .receive(&mut piece.to_vec(), &mut plain)
            .expect("records from a real client");
        got.extend_from_slice(&plain);
        if head_answer.is_none() && !plain.is_empty() {
            let room = (max + 1).saturating_sub(head_buf.len());
            head_buf.extend_from_slice(&plain[..plain.len().min(room)]);
            head_answer = match crate::http::request::parse_head(&head_buf, max, max_headers) {
                Ok(None) => None,
                Ok(Some(h)) => Some(Ok(h.len)),
                Err(_) => Some(Err(())),
            };
        }
    }
    assert_eq!(
        got, rest,
        "the server's plaintext differs from what was sent"
    );
    let whole = &rest[..rest.len().min(max + 1)];
    let at_once = match crate::http::request::parse_head(whole, max, max_headers) {
        Ok(None) => None,
        Ok(Some(h)) => Some(Ok(h.len)),
        // Which refusal (a malformed byte, or the size bound) may depend on how much had come.
        Err(_) => Some(Err(())),
    };
    assert_eq!(head_answer, at_once, "piecewise parsing differs");

    // Server to client: the same bytes as frames, through the connection's flush.
    let mut outbox = crate::shard::outbox::Outbox::default();
    for piece in pieces(rest, sizes) {
        outbox.push(crate::ws::SharedFrame::from(piece.to_vec()));
    }
    let mut wire = Vec::new();
    let (done, blocked) = server
        .flush(&mut outbox, &mut wire, &mut scratch)
        .expect("memory");
    assert!(!blocked && outbox.is_empty());
    assert_eq!(done.bytes, wire.len());
    assert_eq!(server.held_bytes(), 0, "an idle connection holds no buffer");
    let mut back = Vec::new();
    let mut input = &wire[..];
    while !input.is_empty() {
        client
            .read_tls(&mut input)
            .expect("records from the server");
        client
            .process_new_packets()
            .expect("records from the server");
        let _ = client.reader().read_to_end(&mut back);
    }
    assert_eq!(
        back, rest,
        "the client's plaintext differs from the frames flushed"
    );
}
