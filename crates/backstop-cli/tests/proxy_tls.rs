//! An HTTPS upstream: the proxy's hyper-util client over rustls (ring provider),
//! trusting a throwaway self-signed certificate given as an extra root, in front of
//! a TLS terminator that forwards to backstop-mock on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use backstop::mock::{Fault, MockServer, ModelPlan, Scenario};
use backstop_cli::proxy::{self, ProxyConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// TLS on `127.0.0.1:0` with a certificate for `localhost`, each connection's
/// plaintext forwarded to `backend`. Counts completed handshakes and remembers the
/// ALPN protocol the client chose.
struct Terminator {
    port: u16,
    handshakes: Arc<AtomicUsize>,
    alpn: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

async fn terminator(backend: std::net::SocketAddr) -> (Terminator, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("a self-signed certificate");
    let cert_pem = certified.cert.pem();
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    // The mock speaks HTTP/1.1 and h2 (prior knowledge) on the same port, so either
    // protocol the client picks works through the plaintext forward.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let alpn = Arc::new(std::sync::Mutex::new(None));
    let (count, chosen) = (handshakes.clone(), alpn.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (count, chosen) = (count.clone(), chosen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                *chosen.lock().unwrap() = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                // Either side closing ends the forward; the error says nothing new.
                let _closed = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (
        Terminator {
            port,
            handshakes,
            alpn,
        },
        cert_pem,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_reached_over_rustls_with_alpn() {
    let scenario = Scenario::new(1).model("gpt-4o", ModelPlan::script([Fault::OpenAiServerError]));
    let mock = MockServer::start(scenario, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (tls, cert_pem) = terminator(mock.local_addr()).await;
    let config = ProxyConfig::from_toml_str(&format!(
        r#"
        [models.gpt-4o]
        upstream = "openai"
        base_uri = "https://localhost:{port}/v1"
        credential = {{ env = "KEY" }}
        "#,
        port = tls.port
    ))
    .unwrap()
    .with_env(|_| Some("sk-over-tls".into()))
    .with_root_certificates_pem(cert_pem);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy::serve(config, listener).await.expect("proxy starts");

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[]}"#,
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let attempts = response.headers()["x-backstop-attempts"].clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "{body:?}");
    // A 500, then a retry on the pooled connection: one handshake, two attempts.
    assert_eq!(attempts, "2");
    assert_eq!(mock.provider().attempts_for("gpt-4o"), 2);
    assert_eq!(tls.handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(tls.alpn.lock().unwrap().as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        mock.provider().attempts()[0].header("authorization"),
        Some("Bearer sk-over-tls")
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_a_502_connect_failure() {
    let mock = MockServer::start(Scenario::new(1), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (tls, _cert_pem) = terminator(mock.local_addr()).await;
    // No extra root: the self-signed certificate is not trusted.
    let config = ProxyConfig::from_toml_str(&format!(
        r#"
        [models.gpt-4o]
        upstream = "openai"
        base_uri = "https://localhost:{port}/v1"
        "#,
        port = tls.port
    ))
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = match proxy::serve(config, listener).await {
        Ok(proxy) => proxy,
        // A machine with no system roots at all refuses to start with https targets;
        // that refusal is the behaviour to check there.
        Err(error) => {
            assert!(error.to_string().contains("root certificates"), "{error}");
            return;
        }
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("{}/chat/completions", proxy.base_url()))
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[]}"#,
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert_eq!(
        mock.provider().attempt_count(),
        0,
        "nothing got through TLS"
    );
    proxy.shutdown().await;
}
