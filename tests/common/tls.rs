//! TLS for the integration tests: a certificate authority and a server certificate for
//! `localhost` and 127.0.0.1 made fresh per test (rcgen), written where `--tls-cert` and
//! `--tls-key` can read them, and a real client (rustls under tungstenite) that trusts only
//! that authority.

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tungstenite::WebSocket;

/// A WebSocket over TLS.
pub type Wss = WebSocket<StreamOwned<ClientConnection, TcpStream>>;

/// A test authority and the server certificate it signed, on disk.
pub struct TestCert {
    pub dir: PathBuf,
    /// The server's chain (its certificate) and key, for `--tls-cert` / `--tls-key`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The authority's certificate (PEM file and DER), what clients trust.
    pub ca: PathBuf,
    pub ca_der: CertificateDer<'static>,
    /// The server certificate's notAfter, Unix seconds.
    pub not_after: i64,
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test authority's name. Every [`TestCert`] has its own authority with this name.
const CA_NAME: &str = "causeloop-stream test CA";

impl TestCert {
    /// A fresh authority and a server certificate for `localhost` and 127.0.0.1 expiring on
    /// (`year`, `month`, `day`), in a directory of its own named after `tag`.
    pub fn new(tag: &str, year: i32, month: u8, day: u8) -> TestCert {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("causeloop-tls-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = authority();
        let (cert_pem, key_pem, der) = leaf(&ca, &ca_key, year, month, day);
        let paths = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("ca.pem"),
        );
        std::fs::write(&paths.0, cert_pem).unwrap();
        std::fs::write(&paths.1, key_pem).unwrap();
        std::fs::write(&paths.2, ca.pem()).unwrap();
        let not_after = causeloop_stream::tls::not_after(&der).expect("notAfter readable");
        TestCert {
            dir,
            cert: paths.0,
            key: paths.1,
            ca: paths.2,
            ca_der: ca.der().clone(),
            not_after,
        }
    }

    /// `--tls-cert` and `--tls-key` for a test configuration.
    pub fn files(&self) -> causeloop_stream::tls::TlsFiles {
        causeloop_stream::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// Replaces the files on disk with a new certificate from a new authority, expiring on
    /// the given date; returns that authority (DER).
    pub fn replace(&self, year: i32, month: u8, day: u8) -> CertificateDer<'static> {
        let (ca, ca_key) = authority();
        let (cert_pem, key_pem, _) = leaf(&ca, &ca_key, year, month, day);
        std::fs::write(&self.cert, cert_pem).unwrap();
        std::fs::write(&self.key, key_pem).unwrap();
        ca.der().clone()
    }

    /// A client configuration trusting this authority only.
    pub fn client(&self) -> Arc<ClientConfig> {
        client_trusting(&self.ca_der)
    }
}

fn authority() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    (params.self_signed(&key).unwrap(), key)
}

fn leaf(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    year: i32,
    month: u8,
    day: u8,
) -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(year, month, day);
    let cert = params.signed_by(&key, ca, ca_key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// A client configuration trusting `ca` only (ring provider, TLS 1.3 and 1.2).
pub fn client_trusting(ca: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    client_with_roots(roots, &[&rustls::version::TLS13, &rustls::version::TLS12])
}

/// A client configuration trusting `roots`, offering `versions`.
#[allow(deprecated)] // ring, as the server uses (see src/tls.rs)
pub fn client_with_roots(
    roots: RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS stream to `addr` for `localhost`, its handshake not yet driven (the first read or
/// write drives it). Every read waits at most `timeout`.
pub fn tls_stream(
    addr: SocketAddr,
    client: Arc<ClientConfig>,
    timeout: Duration,
) -> StreamOwned<ClientConnection, TcpStream> {
    let sock = TcpStream::connect(addr).expect("tcp connect");
    sock.set_read_timeout(Some(timeout)).unwrap();
    sock.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(client, name).unwrap();
    StreamOwned::new(conn, sock)
}

/// Opens `wss://localhost:<port><path>` through a real TLS client and a real WebSocket client.
pub fn try_connect_wss(
    addr: SocketAddr,
    client: Arc<ClientConfig>,
    path: &str,
) -> Result<Wss, Box<tungstenite::Error>> {
    let stream = tls_stream(addr, client, Duration::from_secs(10));
    let url = format!("wss://localhost:{}{path}", addr.port());
    super::ws_client(&url, stream)
}

/// Like [`try_connect_wss`]; panics if the upgrade fails.
pub fn connect_wss(addr: SocketAddr, client: Arc<ClientConfig>, path: &str) -> Wss {
    try_connect_wss(addr, client, path).unwrap_or_else(|e| panic!("wss connect failed: {e}"))
}

/// An HTTPS request over a fresh connection; the whole response, read until the server closes.
pub fn https(addr: SocketAddr, client: Arc<ClientConfig>, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = tls_stream(addr, client, Duration::from_secs(10));
    s.write_all(request).expect("https write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A server that closes without close_notify ends the response too.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("https read: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
