//! The transport under the stack: hyper-util's pooled legacy client, HTTP/1.1 and
//! HTTP/2 (ALPN) over rustls with the `ring` provider, plain HTTP/1.1 for `http://`
//! targets.
//!
//! Trusted roots: the system's certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` are
//! honoured), plus any the configuration adds for a private CA
//! ([`ProxyConfig::with_root_certificates_pem`](super::ProxyConfig::with_root_certificates_pem)).

use std::sync::Arc;

use backstop::classify::ReplayBody;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::error::ProxyError;

/// The client every attempt goes through.
pub type Upstream = Client<HttpsConnector<HttpConnector>, ReplayBody>;

/// Builds the client. Root certificates are required only when a target is reached
/// over HTTPS (`needs_tls`): a machine without any may still proxy to plain-HTTP
/// targets (a local model server, the mock provider).
pub fn client(needs_tls: bool, extra_roots_pem: &[u8]) -> Result<Upstream, ProxyError> {
    let roots = root_store(extra_roots_pem)?;
    if needs_tls && roots.is_empty() {
        return Err(ProxyError::RootCertificates(
            "no root certificates found on this system".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::RootCertificates(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The builder sets the ALPN protocols (h2, http/1.1) on the TLS configuration.
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The system's roots plus the extra PEM certificates.
fn root_store(extra_roots_pem: &[u8]) -> Result<RootCertStore, ProxyError> {
    let mut roots = RootCertStore::empty();
    // Unreadable or unparsable system certificates are skipped, as browsers do; the
    // store being empty is what matters, and is checked by the caller.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if !extra_roots_pem.is_empty() {
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(extra_roots_pem) {
            let cert = cert.map_err(|e| {
                ProxyError::RootCertificates(format!("the extra root certificates: {e}"))
            })?;
            roots.add(cert).map_err(|e| {
                ProxyError::RootCertificates(format!("an extra root certificate: {e}"))
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(ProxyError::RootCertificates(
                "the extra root certificates hold no PEM CERTIFICATE block".into(),
            ));
        }
    }
    Ok(roots)
}
