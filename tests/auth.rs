//! Authentication after the upgrade: every 4401 and 4003 case, RS256 by PEM and by JWKS `kid`,
//! and expiry while connected. Each refused connection must see the close frame and nothing else.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use causeloop_stream::auth::jwt::{sign_hs256, sign_hs256_with_header};
use common::*;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use std::time::Duration;

fn refused(s: &TestServer, token: &str, workspace: Option<&str>) -> (u16, String) {
    let url = match workspace {
        Some(w) => format!("ws://{}/v1/stream?token={token}&workspace={w}", s.public),
        None => format!("ws://{}/v1/stream?token={token}", s.public),
    };
    let mut ws = connect(&url);
    let got = expect_close(&mut ws, true);
    finish_close(&mut ws);
    got
}

fn claims(extra: &str) -> String {
    format!(
        r#"{{"sub":"usr_1","workspace_id":"ws_1","exp":{}{extra}}}"#,
        now() + 600
    )
}

#[test]
fn every_invalid_token_gets_4401_and_nothing_else() {
    let s = TestServer::with(|c| {
        c.jwt.leeway = Duration::from_secs(5);
        c.jwt.rs256_public_keys = vec![fixture("rsa_public.pem")];
    });
    let good_claims = claims("");
    let rsa_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    // About 9,000 bytes: over the token bound, well inside the default head bound (16 KiB), so
    // it is refused as a token (4401: the seed client stops), not as a head (431: it retries).
    let huge = sign_hs256(
        SECRET,
        claims(&format!(r#","pad":"{}""#, "x".repeat(6630))).as_bytes(),
    );
    assert!(huge.len() >= 9000 && huge.len() < 9100, "{}", huge.len());
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing", String::new(), "invalid token"),
        ("malformed", "not-a-jwt".into(), "invalid token"),
        ("two parts", "abc.def".into(), "invalid token"),
        (
            "bad signature",
            sign_hs256(b"some-other-secret", good_claims.as_bytes()),
            "invalid token",
        ),
        (
            "expired",
            sign_hs256(
                SECRET,
                format!(
                    r#"{{"sub":"u","workspace_id":"ws_1","exp":{}}}"#,
                    now() - 60
                )
                .as_bytes(),
            ),
            "token expired",
        ),
        (
            "not yet valid",
            sign_hs256(
                SECRET,
                format!(
                    r#"{{"sub":"u","workspace_id":"ws_1","exp":{},"nbf":{}}}"#,
                    now() + 600,
                    now() + 300
                )
                .as_bytes(),
            ),
            "token not yet valid",
        ),
        (
            "iat in the future",
            sign_hs256(
                SECRET,
                format!(
                    r#"{{"sub":"u","workspace_id":"ws_1","exp":{},"iat":{}}}"#,
                    now() + 600,
                    now() + 300
                )
                .as_bytes(),
            ),
            "token not yet valid",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(good_claims.as_bytes())
            ),
            "invalid token",
        ),
        (
            "HS256 keyed with the RSA public key",
            sign_hs256(&rsa_pem, good_claims.as_bytes()),
            "invalid token",
        ),
        (
            "alg HS512",
            sign_hs256_with_header(SECRET, br#"{"alg":"HS512"}"#, good_claims.as_bytes()),
            "invalid token",
        ),
        (
            "missing sub",
            sign_hs256(
                SECRET,
                format!(r#"{{"workspace_id":"ws_1","exp":{}}}"#, now() + 600).as_bytes(),
            ),
            "invalid token",
        ),
        (
            "missing exp",
            sign_hs256(SECRET, br#"{"sub":"u","workspace_id":"ws_1"}"#),
            "invalid token",
        ),
        (
            "missing workspace claim",
            sign_hs256(
                SECRET,
                format!(r#"{{"sub":"u","exp":{}}}"#, now() + 600).as_bytes(),
            ),
            "invalid token",
        ),
        ("over 8 KiB", huge, "invalid token"),
    ];
    for (name, tok, phrase) in cases {
        let (code, reason) = refused(&s, &tok, Some("ws_1"));
        assert_eq!(code, 4401, "{name}");
        assert_eq!(reason, phrase, "{name}");
        assert!(
            tok.is_empty() || !reason.contains(&tok),
            "{name}: reason echoes the token"
        );
    }
}

#[test]
fn workspace_mismatch_and_missing_workspace_get_4003() {
    let s = TestServer::start();
    let tok = token("ws_1", "usr_1", 600);
    assert_eq!(
        refused(&s, &tok, Some("ws_2")),
        (4003, "workspace mismatch".to_string())
    );
    assert_eq!(
        refused(&s, &tok, None),
        (4003, "workspace mismatch".to_string())
    );
    // A bad token with a missing workspace is still a 4401: the token is checked first.
    assert_eq!(refused(&s, "junk", None).0, 4401);
}

fn rs256(key_file: &str, header: &str, claims: &str) -> String {
    let der = std::fs::read(fixture(key_file)).unwrap();
    let kp = RsaKeyPair::from_pkcs8(&der).unwrap();
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut sig = vec![0u8; kp.public().modulus_len()];
    kp.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[test]
fn rs256_by_pem_in_both_encodings() {
    for pem in ["rsa_public.pem", "rsa_public_pkcs1.pem"] {
        let s = TestServer::with(|c| {
            c.jwt.hs256_secrets.clear();
            c.jwt.rs256_public_keys = vec![fixture("other_public.pem"), fixture(pem)];
        });
        let tok = rs256(
            "rsa_private.pk8",
            r#"{"alg":"RS256","typ":"JWT"}"#,
            &claims(""),
        );
        let mut ws = connect(&s.url(&tok, "ws_1"));
        assert!(read_text(&mut ws).contains(r#""user_id":"usr_1""#), "{pem}");
        // Signed by a key the server does not trust.
        let s2 = TestServer::with(|c| {
            c.jwt.hs256_secrets.clear();
            c.jwt.rs256_public_keys = vec![fixture(pem)];
        });
        let bad = rs256("other_private.pk8", r#"{"alg":"RS256"}"#, &claims(""));
        assert_eq!(refused(&s2, &bad, Some("ws_1")).0, 4401);
        // An HS256 token is refused by a server with only RSA keys.
        assert_eq!(
            refused(&s2, &token("ws_1", "usr_1", 600), Some("ws_1")).0,
            4401
        );
    }
}

fn jwk(pem: &str, kid: &str) -> String {
    let text = std::fs::read(fixture(pem)).unwrap();
    let keys = causeloop_stream::auth::keys::parse_pem_keys(&text).unwrap();
    format!(
        r#"{{"kty":"RSA","kid":"{kid}","use":"sig","alg":"RS256","n":"{}","e":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(&keys[0].n),
        URL_SAFE_NO_PAD.encode(&keys[0].e)
    )
}

#[test]
fn rs256_by_jwks_kid() {
    let dir = std::env::temp_dir().join(format!("causeloop-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    let ec = r#"{"kty":"EC","kid":"ec1","crv":"P-256","x":"AA","y":"AA"}"#;
    std::fs::write(
        &path,
        format!(
            r#"{{"keys":[{},{ec},{}]}}"#,
            jwk("other_public.pem", "k-old"),
            jwk("rsa_public.pem", "k-new")
        ),
    )
    .unwrap();
    let s = TestServer::with(|c| {
        c.jwt.hs256_secrets.clear();
        c.jwt.jwks_file = Some(path.clone());
    });
    for (key, kid) in [("rsa_private.pk8", "k-new"), ("other_private.pk8", "k-old")] {
        let tok = rs256(
            key,
            &format!(r#"{{"alg":"RS256","kid":"{kid}"}}"#),
            &claims(""),
        );
        let mut ws = connect(&s.url(&tok, "ws_1"));
        assert!(read_text(&mut ws).contains("connected"), "{kid}");
    }
    // The right key under the wrong kid is refused: kid picks the key.
    let wrong = rs256(
        "rsa_private.pk8",
        r#"{"alg":"RS256","kid":"k-old"}"#,
        &claims(""),
    );
    assert_eq!(refused(&s, &wrong, Some("ws_1")).0, 4401);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn expiry_while_connected_closes_4401() {
    let s = TestServer::with(|c| {
        c.jwt.leeway = Duration::ZERO;
        c.heartbeat_interval = Duration::from_millis(300);
    });
    let tok = token("ws_exp", "usr_1", 2);
    let mut ws = connect(&s.url(&tok, "ws_exp"));
    assert!(read_text(&mut ws).contains("connected"));
    let (code, reason) = expect_close(&mut ws, false);
    assert_eq!((code, reason.as_str()), (4401, "token expired"));
    finish_close(&mut ws);
}

#[test]
fn sighup_style_reload_picks_up_a_new_secret_file() {
    let dir = std::env::temp_dir().join(format!("causeloop-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secrets");
    std::fs::write(&path, "first-secret\n").unwrap();
    let s = TestServer::with(|c| {
        c.jwt.hs256_secrets.clear();
        c.jwt.hs256_secret_file = Some(path.clone());
    });
    let with = |secret: &[u8]| sign_hs256(secret, claims("").as_bytes());
    let mut kept = connect(&s.url(&with(b"first-secret"), "ws_1"));
    assert!(read_text(&mut kept).contains("connected"));
    std::fs::write(&path, "second-secret\nthird-secret\n").unwrap();
    s.server().reload_keys().unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        let mut ws = connect(&s.url(&with(b"third-secret"), "ws_1"));
        matches!(ws.read(), Ok(tungstenite::Message::Text(t)) if t.contains("connected"))
    }));
    assert_eq!(refused(&s, &with(b"first-secret"), Some("ws_1")).0, 4401);
    // A broken file keeps the old keys.
    std::fs::write(&path, "").unwrap();
    assert!(s.server().reload_keys().is_err());
    let mut ws = connect(&s.url(&with(b"second-secret"), "ws_1"));
    assert!(read_text(&mut ws).contains("connected"));
    // The connection opened under the old key was not touched.
    kept.send(tungstenite::Message::Ping(b"still here".to_vec()))
        .unwrap();
    expect_pong(&mut kept, b"still here");
    std::fs::remove_dir_all(&dir).ok();
}
