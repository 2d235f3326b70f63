//! The delivery client and proxies, over real sockets (no Kafka): proxies named by the environment
//! are ignored, and a configured proxy carries deliveries while the destination guard still
//! applies. Its own test binary, because it sets process-wide proxy environment variables.

mod common;

use std::time::Duration;

use common::{Receiver, CURRENT_KEY, WAIT};
use kstash::delivery::guard::DestinationPolicy;
use kstash::delivery::http::{HttpDelivery, Outcome, Timeouts};
use kstash::model::envelope::Envelope;
use kstash::signing::Signer;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Environment variables through which HTTP clients commonly pick up a proxy.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// A stand-in HTTP proxy on 127.0.0.1: reports each request head it gets and answers 200.
struct FakeProxy {
    url: url::Url,
    heads: mpsc::UnboundedReceiver<String>,
}

impl FakeProxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (tx, heads) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        FakeProxy { url, heads }
    }

    /// The next request head the proxy got, within `WAIT`.
    async fn next(&mut self) -> String {
        tokio::time::timeout(WAIT, self.heads.recv())
            .await
            .expect("the proxy gets a request")
            .unwrap()
    }
}

fn client(allowed: &[&str], proxy: Option<&url::Url>) -> HttpDelivery {
    HttpDelivery::new(
        Signer::new(CURRENT_KEY, "sig_next_key_for_the_ssrf_tests"),
        DestinationPolicy::new(allowed.iter().map(|n| n.parse().unwrap()).collect()),
        "Upstash-QStash",
        Timeouts {
            default: Duration::from_secs(10),
            max: Duration::from_secs(10),
        },
        proxy,
    )
    .unwrap()
}

fn envelope(url: &str) -> Envelope {
    serde_json::from_value(json!({
        "v": 1,
        "messageId": "msg_ssrf",
        "url": url,
        "method": "POST",
        "bodyBase64": "aGk=",
        "createdAt": 0,
        "notBefore": 0,
        "maxRetries": 0,
        "retried": 0,
    }))
    .unwrap()
}

async fn attempt(client: &HttpDelivery, url: &str) -> Outcome {
    let request = client.prepare(&envelope(url)).expect("a valid request");
    client.call(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_in_the_environment_are_ignored() {
    let mut proxy = FakeProxy::start().await;
    for name in PROXY_VARIABLES {
        std::env::set_var(name, proxy.url.as_str());
    }
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
    let mut receiver = Receiver::start().await;

    let outcome = attempt(&client(&["127.0.0.0/8"], None), &receiver.url("/direct")).await;

    assert!(matches!(outcome, Outcome::Delivered(_)), "{outcome:?}");
    assert_eq!(receiver.next().await.uri.path(), "/direct");
    assert!(
        proxy.heads.try_recv().is_err(),
        "the proxy named by the environment was used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_proxy_carries_deliveries_and_the_guard_still_applies() {
    let mut proxy = FakeProxy::start().await;
    let receiver = Receiver::start().await;
    let port = receiver.addr.port();

    // Allowed destination: the request goes to the proxy, in absolute form.
    let allowed = client(&["127.0.0.0/8", "::1/128"], Some(&proxy.url));
    let outcome = attempt(&allowed, &format!("http://localhost:{port}/via")).await;
    assert!(matches!(outcome, Outcome::Delivered(_)), "{outcome:?}");
    let head = proxy.next().await;
    assert!(
        head.starts_with(&format!("POST http://localhost:{port}/via HTTP/1.1")),
        "{head}"
    );

    // A name that resolves to a refused address is not handed to the proxy.
    let guarded = client(&[], Some(&proxy.url));
    let outcome = attempt(&guarded, &format!("http://localhost:{port}/refused")).await;
    match outcome {
        Outcome::Error(e) => assert!(e.contains("does not deliver to"), "{e}"),
        other => panic!("a loopback destination went out: {other:?}"),
    }
    // Nor is an IP literal.
    let refused = guarded.prepare(&envelope(&format!("http://127.0.0.1:{port}/literal")));
    assert!(refused.is_err(), "an internal IP literal was prepared");
    assert!(
        proxy.heads.try_recv().is_err(),
        "a refused destination reached the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_do_not_repeat_credentials_of_the_destination() {
    // Nothing listens on port 1 of loopback: the attempt fails with a connection error.
    let outcome = attempt(
        &client(&["127.0.0.0/8"], None),
        "http://user:s3cret-pass@127.0.0.1:1/x",
    )
    .await;
    match outcome {
        Outcome::Error(e) => {
            assert!(!e.contains("s3cret-pass"), "credentials in the error: {e}");
            assert!(!e.is_empty());
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
}
