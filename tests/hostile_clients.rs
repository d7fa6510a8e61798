//! Hostile clients: slowloris connections, connection floods, protocol-level errors,
//! oversized bodies still being sent, duplicate JSON keys and odd spellings of the bearer
//! scheme. Each test owns a gateway on port 0; connection-level behaviour is driven with raw
//! TCP sockets.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::eventually::eventually;
use support::gateway::{audit_trail, config, metric, TestGateway, ADMIN_TOKEN, MERCHANT_TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A request cut off in the middle of its headers.
const HALF_SENT: &[u8] = b"POST /v1/redeem HTTP/1.1\r\nHost: kamigate\r\nContent-Type: appl";

/// A client that keeps no idle connections, so a server closing idle ones cannot race it.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// Reads until the server closes the connection (EOF or reset); returns what was read and
/// when the connection ended, or `None` if it was still open at `deadline`.
async fn until_closed(mut stream: TcpStream, deadline: Instant) -> Option<(Vec<u8>, Instant)> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((received, Instant::now())),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Opens a connection and sends `bytes`; a server that already closed it is fine.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let _ = stream.write_all(bytes).await;
    stream
}

#[tokio::test]
async fn half_sent_requests_are_cut_after_the_header_read_timeout() {
    let timeout = Duration::from_millis(800);
    let mut cfg = config();
    cfg.header_read_timeout_ms = timeout.as_millis() as u64;
    let gw = TestGateway::start(cfg).await;
    let public = gw.gateway.public_addr;
    // Generous: a stuck connection fails the test, a busy machine does not.
    let deadline = Instant::now() + Duration::from_secs(15);

    let started = Instant::now();
    // Part of a request, then nothing.
    let stalled = tokio::spawn(until_closed(send_raw(public, HALF_SENT).await, deadline));
    // Nothing at all.
    let silent = tokio::spawn(until_closed(
        TcpStream::connect(public).await.expect("connects"),
        deadline,
    ));
    // A byte every 100 ms: the timeout bounds the whole head, not the gap between reads.
    let trickle = TcpStream::connect(public).await.expect("connects");
    let (reader, mut writer) = trickle.into_split();
    let trickling = tokio::spawn(async move {
        let head = b"POST /v1/redeem HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 10_000].iter());
        for byte in head {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let trickled = tokio::spawn(async move {
        let mut reader = reader;
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
                Ok(Ok(_)) => {}
            }
        }
    });
    // A whole request answered, then an idle keep-alive connection.
    let body = r#"{"code":"NEVER-SEEN-1","redeemer":"u-1"}"#;
    let request = format!(
        "POST /v1/redeem HTTP/1.1\r\nHost: kamigate\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let idle = tokio::spawn(until_closed(
        send_raw(public, request.as_bytes()).await,
        deadline,
    ));

    // Meanwhile other clients are served as usual.
    let res = fresh_client()
        .post(format!("{}/v1/redeem", gw.public))
        .json(&json!({"code": "NEVER-SEEN-2", "redeemer": "u-2"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    let cut = |what: &str, at: Option<Instant>| {
        let at = at.unwrap_or_else(|| panic!("the {what} connection was never closed"));
        let after = at - started;
        // The timer starts when the connection is accepted, after `started`.
        assert!(
            after >= timeout - Duration::from_millis(20),
            "the {what} connection was closed after {after:?}, before the timeout"
        );
    };
    let (nothing, at) = stalled.await.expect("task").unzip();
    cut("stalled", at);
    assert_eq!(
        nothing.as_deref(),
        Some(&b""[..]),
        "no answer to half a request"
    );
    cut("silent", silent.await.expect("task").map(|(_, at)| at));
    cut("trickling", trickled.await.expect("task"));
    trickling.abort();
    let (answer, at) = idle.await.expect("task").unzip();
    cut("idle keep-alive", at);
    let answer = String::from_utf8_lossy(answer.as_deref().unwrap_or_default()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("ERR_CARD_INVALID"), "{answer}");

    let text = gw.metrics().await;
    let timeouts = metric(
        &text,
        "kamigate_header_read_timeouts_total",
        &["listener=\"public\""],
    );
    assert!(timeouts.is_some_and(|n| n >= 3.0), "{timeouts:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_flood_is_capped_and_readiness_and_other_clients_are_served() {
    const CAP: usize = 32;
    const FLOOD: usize = 300;
    let timeout = Duration::from_secs(5);
    let mut cfg = config();
    cfg.max_connections = CAP;
    cfg.header_read_timeout_ms = timeout.as_millis() as u64;
    let gw = TestGateway::start(cfg).await;
    let public = gw.gateway.public_addr;
    let deadline = Instant::now() + timeout + Duration::from_secs(25);

    let started = Instant::now();
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let stream = send_raw(public, HALF_SENT).await;
        flood.push(tokio::spawn(until_closed(stream, deadline)));
    }

    // While the public listener is full, the admin listener answers at once...
    let admin = fresh_client();
    let ready = admin
        .get(format!("{}/readyz", gw.admin))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .expect("readiness is answered during the flood");
    assert_eq!(ready.status(), StatusCode::OK);
    // ...and another public connection is closed at once rather than left waiting.
    let body = r#"{"code":"NEVER-SEEN-1","redeemer":"u-1"}"#;
    let request = format!(
        "POST /v1/redeem HTTP/1.1\r\nHost: kamigate\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let refused = until_closed(send_raw(public, request.as_bytes()).await, deadline)
        .await
        .expect("a connection past the cap is closed");
    assert!(refused.0.is_empty(), "no answer past the cap");
    assert!(
        started.elapsed() < timeout,
        "the flood had to still be in place: this check came too late to mean anything"
    );

    // No held connection can be cut before the header read timeout, which starts after
    // `started`: every connection closed before then was refused at the cap.
    let mut refused_at_cap = 0;
    let mut timed_out = 0;
    for watcher in flood {
        let (_, at) = watcher
            .await
            .expect("task")
            .expect("every flood connection is closed by the deadline");
        if at - started < timeout {
            refused_at_cap += 1;
        } else {
            timed_out += 1;
        }
    }
    assert_eq!(
        (refused_at_cap, timed_out),
        (FLOOD - CAP, CAP),
        "the cap holds {CAP} connections and refuses the rest; the timeout cuts those held"
    );

    // The flood is gone: a legitimate client gets its answer (it may race the last slots
    // being released, so it retries like any client would).
    let client = fresh_client();
    let served = eventually(
        deadline.saturating_duration_since(Instant::now()),
        "the public listener to serve again",
        || {
            client
                .post(format!("{}/v1/redeem", gw.public))
                .json(&json!({"code": "NEVER-SEEN-2", "redeemer": "u-2"}))
                .send()
        },
        Result::is_ok,
    )
    .await
    .expect("answered");
    assert_eq!(served.status(), StatusCode::NOT_FOUND);
    let text = gw.metrics().await;
    let refusals = metric(
        &text,
        "kamigate_connections_refused_total",
        &["listener=\"public\""],
    );
    assert!(
        refusals.is_some_and(|n| n >= (FLOOD - CAP) as f64),
        "{refusals:?}"
    );
    gw.stop().await;
}

/// Checks an error answer: status, JSON content type, code and a message; returns the body.
/// Sends a request whose body is over the limit, all of it, as a client does that reads no
/// answer before it has sent its request; then reads the answer until the gateway closes.
/// An error if sending failed (the gateway reset the connection).
/// `chunked`: no declared length, the body in 16 KiB chunks (the limit is found while
/// reading); otherwise a `Content-Length` over the limit (refused before reading) and the
/// body in one write.
async fn send_oversized(
    addr: SocketAddr,
    body: &[u8],
    chunked: bool,
    deadline: Instant,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let head = format!(
        "POST /v1/redeem HTTP/1.1\r\nHost: kamigate\r\nContent-Type: application/json\r\n\
         {framing}\r\n\r\n"
    );
    let sent = tokio::time::timeout_at(deadline, async {
        stream.write_all(head.as_bytes()).await?;
        if chunked {
            for chunk in body.chunks(16 * 1024) {
                stream
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                stream.write_all(chunk).await?;
                stream.write_all(b"\r\n").await?;
            }
            stream.write_all(b"0\r\n\r\n").await?;
        } else {
            stream.write_all(body).await?;
        }
        stream.flush().await
    })
    .await;
    // Most clients give up on a request whose sending failed and never read its answer
    // (they report a reset, not the 413): the gateway must take the whole body in, not
    // close on it.
    match sent {
        Err(_) => panic!("the gateway neither read the body nor closed the connection"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => {}
    }
    Ok(until_closed(stream, deadline)
        .await
        .map(|(answer, _)| answer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_its_413_even_while_the_client_is_still_sending() {
    let mut cfg = config();
    // Every request here is answered 413; none may be answered 429 instead.
    cfg.limits.public.per_second = 1_000_000;
    cfg.limits.public.burst = 1_000_000;
    let gw = TestGateway::start(cfg).await;
    let public = gw.gateway.public_addr;
    let limit = gw.gateway.app.limits.max_body_bytes;
    // 1 MiB against a 64 KiB limit: far more than the socket buffers hold in flight.
    let body = vec![b'x'; 1 << 20];
    assert!(body.len() as u64 > 4 * limit);

    for attempt in 0..50 {
        let chunked = attempt % 2 == 1;
        // Generous: a stuck connection fails the test, a busy machine does not.
        let deadline = Instant::now() + Duration::from_secs(20);
        let answer = send_oversized(public, &body, chunked, deadline)
            .await
            .unwrap_or_else(|e| {
                panic!("attempt {attempt} (chunked: {chunked}): sending the body failed: {e}")
            })
            .unwrap_or_else(|| panic!("attempt {attempt}: the connection was never closed"));
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 413 "),
            "attempt {attempt} (chunked: {chunked}): no 413 read, got {} bytes: {text:?}",
            answer.len()
        );
        let (head, json) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.to_ascii_lowercase().contains("\r\nconnection: close"),
            "attempt {attempt}: the answer says the connection closes: {head}"
        );
        let json: Value = serde_json::from_str(json).expect("a JSON envelope");
        assert_eq!(error_code(&json), "ERR_PAYLOAD_TOO_LARGE", "{json}");
        assert_eq!(json["error"]["limit_bytes"], limit, "{json}");
    }

    // Other clients were served all along.
    let res = fresh_client()
        .post(format!("{}/v1/redeem", gw.public))
        .json(&json!({"code": "NEVER-SEEN-3", "redeemer": "u-3"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    gw.stop().await;
}

async fn envelope(res: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(res.status(), status, "{code}");
    let content_type = res.headers().get("content-type").cloned();
    assert_eq!(
        content_type.as_ref().and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{code}"
    );
    let body: Value = res.json().await.expect("a JSON body");
    assert_eq!(error_code(&body), code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test]
async fn another_method_on_a_known_route_is_405_with_allow() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["METHOD-CODE-1"]).await;
    let client = &gw.client;
    let cases = [
        (client.get(format!("{}/v1/redeem", gw.public)), "POST"),
        (
            client
                .put(format!("{}/v1/skus/s", gw.public))
                .bearer_auth(MERCHANT_TOKEN),
            "GET",
        ),
        (
            client
                .delete(format!("{}/v1/skus/s", gw.admin))
                .bearer_auth(ADMIN_TOKEN),
            "GET, PUT",
        ),
        (client.post(format!("{}/readyz", gw.admin)), "GET"),
        (client.get(format!("{}/v1/keys/s.1/void", gw.admin)), "POST"),
    ];
    for (req, allow) in cases {
        let res = req.send().await.expect("answered");
        let allowed = res.headers().get("allow").cloned();
        assert_eq!(allowed.as_ref().and_then(|v| v.to_str().ok()), Some(allow));
        let body = envelope(
            res,
            StatusCode::METHOD_NOT_ALLOWED,
            "ERR_METHOD_NOT_ALLOWED",
        )
        .await;
        assert!(
            body["error"]["hint"]
                .as_str()
                .is_some_and(|h| h.contains(allow)),
            "{body}"
        );
    }
    // Unknown paths stay 404, whatever the method.
    let res = client
        .delete(format!("{}/v1/nothing-here", gw.public))
        .send()
        .await
        .expect("answered");
    envelope(res, StatusCode::NOT_FOUND, "ERR_NOT_FOUND").await;
    assert_eq!(gw.counts("s").await["available"], 1, "nothing changed");
    gw.stop().await;
}

#[tokio::test]
async fn protocol_errors_come_in_the_json_envelope() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["ENV-CODE-1"]).await;
    let client = &gw.client;

    // A request target over `max_uri_bytes` (hyper alone would accept up to 64 KiB).
    let long = format!("{}/v1/redeem?pad={}", gw.public, "a".repeat(9000));
    let res = client.post(long).send().await.expect("answered");
    let body = envelope(res, StatusCode::URI_TOO_LONG, "ERR_URI_TOO_LONG").await;
    assert_eq!(body["error"]["limit_bytes"], 8192);

    // Headers over `max_header_bytes`, and more header lines than `max_headers` (hyper
    // alone would answer a bare 431 past 100 lines).
    let res = client
        .post(format!("{}/v1/redeem", gw.public))
        .header("x-pad", "p".repeat(20_000))
        .send()
        .await
        .expect("answered");
    envelope(
        res,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "ERR_HEADERS_TOO_LARGE",
    )
    .await;
    let mut many = client.get(format!("{}/readyz", gw.admin));
    for i in 0..150 {
        many = many.header(format!("x-h-{i}"), "1");
    }
    let body = envelope(
        many.send().await.expect("answered"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "ERR_HEADERS_TOO_LARGE",
    )
    .await;
    assert_eq!(body["error"]["limit_headers"], 100);

    // Bodies over `max_body_bytes`, and malformed JSON.
    let res = client
        .post(format!("{}/v1/redeem", gw.public))
        .body(vec![b' '; 70_000])
        .send()
        .await
        .expect("answered");
    envelope(res, StatusCode::PAYLOAD_TOO_LARGE, "ERR_PAYLOAD_TOO_LARGE").await;
    let res = client
        .post(format!("{}/v1/redeem", gw.public))
        .body("{\"code\": ")
        .send()
        .await
        .expect("answered");
    envelope(res, StatusCode::BAD_REQUEST, "ERR_BAD_REQUEST").await;

    assert_eq!(gw.counts("s").await["available"], 1, "nothing changed");
    gw.stop().await;
}

#[tokio::test]
async fn duplicate_json_keys_are_bad_requests_on_every_endpoint_and_change_nothing() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["DUP-CODE-1", "DUP-CODE-2", "DUP-CODE-3"])
        .await;
    let (status, order) = gw.claim("s", json!({"order_id": "o-sold"})).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let sold = order["keys"][0]["code"].as_str().expect("code").to_owned();
    let key_id = order["keys"][0]["key_id"].as_str().expect("key").to_owned();
    let client = &gw.client;
    let raw = |req: reqwest::RequestBuilder, body: String| {
        req.header("content-type", "application/json").body(body)
    };

    let cases = vec![
        (
            "redeem",
            raw(
                client.post(format!("{}/v1/redeem", gw.public)),
                format!(r#"{{"code":"{sold}","redeemer":"u-1","redeemer":"u-2"}}"#),
            ),
        ),
        (
            "claim",
            raw(
                client
                    .post(format!("{}/v1/skus/s/claims", gw.public))
                    .bearer_auth(MERCHANT_TOKEN),
                r#"{"order_id":"a","order_id":"b"}"#.into(),
            ),
        ),
        (
            "put sku",
            raw(
                client
                    .put(format!("{}/v1/skus/fresh", gw.admin))
                    .bearer_auth(ADMIN_TOKEN),
                r#"{"max_uses":1,"max_uses":5}"#.into(),
            ),
        ),
        (
            "put sku, nested",
            raw(
                client
                    .put(format!("{}/v1/skus/fresh", gw.admin))
                    .bearer_auth(ADMIN_TOKEN),
                r#"{"format":{"preset":"default","preset":"crockford32"}}"#.into(),
            ),
        ),
        (
            "reconcile",
            raw(
                client
                    .post(format!("{}/v1/reconcile", gw.admin))
                    .bearer_auth(ADMIN_TOKEN),
                r#"{"repair":false,"repair":true}"#.into(),
            ),
        ),
        (
            "void",
            raw(
                client
                    .post(format!("{}/v1/keys/{key_id}/void", gw.admin))
                    .bearer_auth(ADMIN_TOKEN),
                r#"{"reason":"fraud","reason":"test"}"#.into(),
            ),
        ),
    ];
    for (endpoint, req) in cases {
        let res = req.send().await.expect("answered");
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{endpoint}");
        let body: Value = res.json().await.expect("json");
        assert_eq!(error_code(&body), "ERR_BAD_REQUEST", "{endpoint}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("duplicate key"),
            "{endpoint}: {message}"
        );
    }

    assert_eq!(
        gw.counts("s").await,
        json!({"available": 2, "held": 0, "claimed": 1, "redeemed": 0, "void": 0}),
        "nothing was claimed, redeemed or voided"
    );
    for order_id in ["a", "b"] {
        let (status, _) = gw
            .merchant_get(&format!("/v1/skus/s/claims/{order_id}"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "order {order_id}");
    }
    let (status, _) = gw.merchant_get("/v1/skus/fresh").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no SKU was created");
    let (_, kinds) = audit_trail(client, &gw.admin, &key_id).await;
    assert!(!kinds.iter().any(|k| k == "void"), "{kinds:?}");

    // Restoring with a duplicate key leaves a voided key void.
    let (status, _) = gw
        .admin_post(
            &format!("/v1/keys/{key_id}/void"),
            json!({"reason": "fraud"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let res = raw(
        client
            .post(format!("{}/v1/keys/{key_id}/restore", gw.admin))
            .bearer_auth(ADMIN_TOKEN),
        r#"{"reason":"ok","reason":"ok"}"#.into(),
    )
    .send()
    .await
    .expect("answered");
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(gw.counts("s").await["void"], 1);
    gw.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_case_insensitively_and_the_token_is_not() {
    let gw = TestGateway::embedded().await;
    gw.stock("s", &["AUTH-CODE-1"]).await;
    let sku_view = |authorization: String| {
        gw.client
            .get(format!("{}/v1/skus/s", gw.public))
            .header("authorization", authorization)
            .send()
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR", "Bearer  "] {
        let res = sku_view(format!("{scheme} {MERCHANT_TOKEN}"))
            .await
            .expect("answered");
        assert_eq!(res.status(), StatusCode::OK, "scheme {scheme:?}");
    }
    let wrong = [
        format!("Bearer {}", MERCHANT_TOKEN.to_uppercase()),
        format!("bearer {}", &MERCHANT_TOKEN[..MERCHANT_TOKEN.len() - 1]),
        format!("Basic {MERCHANT_TOKEN}"),
        format!("Bearer{MERCHANT_TOKEN}"),
        format!("Bearer {ADMIN_TOKEN}"),
    ];
    for authorization in wrong {
        let res = sku_view(authorization.clone()).await.expect("answered");
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{authorization}");
        let body: Value = res.json().await.expect("json");
        assert_eq!(error_code(&body), "ERR_UNAUTHORIZED");
    }
    let res = gw
        .client
        .put(format!("{}/v1/skus/lower", gw.admin))
        .header("authorization", format!("bearer {ADMIN_TOKEN}"))
        .json(&json!({}))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::CREATED, "admin routes too");
    gw.stop().await;
}
