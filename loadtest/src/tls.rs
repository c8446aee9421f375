//! `wss://`: the client side of TLS for every scenario. A worker builds one rustls client
//! configuration and gives each connection its own session, driven from the worker's mio loop
//! the way the server drives its own: records in with `read_tls`, plaintext out with the reader,
//! plaintext in with the writer, records out with `write_tls`.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How a worker speaks TLS (`--url wss://...`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsSpec {
    /// The name the certificate must carry (and SNI): the URL's host.
    pub server_name: String,
    /// A PEM file of the authorities to trust (`--ca-file`); none: `--insecure` must be set.
    pub ca_file: Option<String>,
    /// Accept any certificate (`--insecure`): for measuring, never for trusting.
    pub insecure: bool,
}

#[allow(deprecated)] // ring, the server's provider (its src/tls.rs says why)
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration of a worker.
pub fn client_config(spec: &TlsSpec) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if spec.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let path = spec
            .ca_file
            .as_deref()
            .ok_or("wss:// needs --ca-file (or --insecure)")?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))? {
            let cert = cert.map_err(|e| format!("{path}: {e}"))?;
            roots.add(cert).map_err(|e| format!("{path}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("{path}: no certificate"));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A session for one connection.
pub fn session(
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> Result<rustls::ClientConnection, String> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())
}

/// `--insecure`: any certificate is accepted; the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
