//! The transport under the stack: hyper-util's pooled legacy client, HTTP/1.1 and
//! HTTP/2 (ALPN) over rustls with the `ring` provider and the system's root
//! certificates, plain HTTP/1.1 for `http://` targets.

use std::sync::Arc;

use backstop::classify::ReplayBody;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::error::ProxyError;

/// The client every attempt goes through.
pub type Upstream = Client<HttpsConnector<HttpConnector>, ReplayBody>;

/// Builds the client. The system's root certificates are required only when a
/// target is reached over HTTPS (`needs_tls`); a machine without any may still
/// proxy to plain-HTTP targets (a local model server, the mock provider).
pub fn client(needs_tls: bool) -> Result<Upstream, ProxyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        match HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
            Ok(builder) => builder,
            Err(error) if needs_tls => return Err(ProxyError::RootCertificates(error)),
            Err(_) => {
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ProxyError::RootCertificates(std::io::Error::other(e)))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                HttpsConnectorBuilder::new().with_tls_config(tls)
            }
        };
    let connector = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
