//! Hostile clients of the management HTTP API, against the real binary: an endless request
//! line, bodies too large or too slow, a slow client beside normal ones, too many connections,
//! and a foreign web page posting a cluster command (CSRF).
//!
//! A cluster command is observed from outside: `POST /api/v5/cluster/join?node=127.0.0.1:P`
//! makes the node dial port P, where the test listens; an accepted connection there means the
//! command was executed.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The API's limits (src/api/server.rs), restated as the behaviour the tests expect.
const HEAD_MAX_BYTES: usize = 16 * 1024;
const BODY_MAX_BYTES: usize = 1024 * 1024;

/// A broker with its management API and cluster listener on free loopback ports.
fn broker_with_api() -> (Broker, SocketAddr) {
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cluster = format!("127.0.0.1:{}", free_port());
    let broker = Broker::start(&[
        ("MANAGEMENT__BIND", &api.to_string()),
        ("CLUSTER__BIND", &cluster),
    ]);
    // The API binds after the MQTT listener that Broker::start waited for.
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(api).is_err() {
        assert!(
            Instant::now() < deadline,
            "API not listening:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (broker, api)
}

/// A listener standing for a cluster peer: accepting on it proves a `join` was executed.
struct JoinTarget(TcpListener);

impl JoinTarget {
    fn new() -> JoinTarget {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        JoinTarget(l)
    }

    fn join_path(&self) -> String {
        let port = self.0.local_addr().unwrap().port();
        format!("/api/v5/cluster/join?node=127.0.0.1:{port}")
    }

    /// Whether the node dialled this target within `wait`.
    fn dialled_within(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            match self.0.accept() {
                Ok(_) => return true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn connect(api: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads an answer to the end; `None` if the connection was reset before any byte came.
fn read_answer(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => {
                assert_ne!(e.kind(), ErrorKind::WouldBlock, "no answer within 15 s");
                return None;
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// One request on a fresh connection; the status and body of the answer.
fn request(api: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = connect(api);
    s.write_all(raw.as_bytes()).unwrap();
    read_answer(&mut s).expect("an answer")
}

fn post(api: SocketAddr, path: &str, extra_headers: &str) -> (u16, String) {
    request(
        api,
        &format!("POST {path} HTTP/1.1\r\nHost: {api}\r\n{extra_headers}Content-Length: 0\r\n\r\n"),
    )
}

#[test]
fn an_endless_request_line_is_refused_without_memory_growth() {
    let (broker, api) = broker_with_api();
    let before = broker.rss_kib();
    let mut s = connect(api);
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    let _ = s.write_all(b"GET /");
    // 64 MiB of request line without a newline: the old server buffered all of it.
    while sent < 64 * 1024 * 1024 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let growth = broker.rss_kib().saturating_sub(before);
    assert!(
        sent < 8 * 1024 * 1024,
        "the server kept reading: {sent} bytes taken"
    );
    assert!(growth < 8 * 1024, "RSS grew by {growth} KiB");
    if let Some((status, _)) = read_answer(&mut s) {
        assert!(
            status == 431 || status == 414,
            "status {status} for a {sent}-byte request line"
        );
    }
    // The API still answers.
    let (status, _) = request(
        api,
        &format!("GET /api/v5/stats HTTP/1.1\r\nHost: {api}\r\n\r\n"),
    );
    assert_eq!(status, 200);
}

#[test]
fn headers_past_the_head_limit_get_431() {
    let (_broker, api) = broker_with_api();
    let filler = "x".repeat(HEAD_MAX_BYTES);
    let (status, _) = request(
        api,
        &format!("GET /api/v5/stats HTTP/1.1\r\nHost: {api}\r\nX-Filler: {filler}\r\n\r\n"),
    );
    assert_eq!(status, 431);
}

#[test]
fn a_body_over_the_limit_gets_413_and_the_command_is_not_executed() {
    let (_broker, api) = broker_with_api();
    let target = JoinTarget::new();
    // Declared too large: refused before the body is sent.
    let (status, body) = request(
        api,
        &format!(
            "POST {} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            target.join_path(),
            2 * BODY_MAX_BYTES
        ),
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("PAYLOAD_TOO_LARGE"), "{body}");
    // Chunked, so the size is only known by reading: refused once the limit is passed.
    let mut s = connect(api);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        target.join_path()
    );
    s.write_all(head.as_bytes()).unwrap();
    let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
    for _ in 0..(BODY_MAX_BYTES / 0x10000 + 2) {
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    // The server may close with our last chunks unread (a reset); when the answer came, it is 413.
    if let Some((status, body)) = read_answer(&mut s) {
        assert_eq!(status, 413, "{body}");
    }
    assert!(
        !target.dialled_within(Duration::from_secs(1)),
        "join executed despite a refused body"
    );
}

#[test]
fn a_command_waits_for_its_whole_body() {
    let (_broker, api) = broker_with_api();
    let target = JoinTarget::new();
    let mut s = connect(api);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{",
        target.join_path()
    );
    s.write_all(head.as_bytes()).unwrap();
    // Half the body: no answer and no action yet.
    assert!(
        !target.dialled_within(Duration::from_millis(1500)),
        "join executed before its body arrived"
    );
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("answered before the body arrived: {other:?}"),
    }
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"}").unwrap();
    let (status, body) = read_answer(&mut s).expect("an answer");
    assert_eq!(status, 200, "{body}");
    assert!(target.dialled_within(WAIT), "join not executed");
}

#[test]
fn a_body_that_never_completes_gets_408_and_is_not_executed() {
    let (_broker, api) = broker_with_api();
    let target = JoinTarget::new();
    let mut s = connect(api);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        target.join_path()
    );
    s.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    let (status, body) = read_answer(&mut s).expect("an answer");
    assert_eq!(status, 408, "{body}");
    // The deadline is 10 s for the whole request.
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "{:?}",
        started.elapsed()
    );
    assert!(!target.dialled_within(Duration::from_millis(500)));
}

#[test]
fn a_slow_client_does_not_block_others_and_is_cut_at_the_deadline() {
    let (_broker, api) = broker_with_api();
    let mut slow = connect(api);
    let request_bytes = format!("GET /api/v5/stats HTTP/1.1\r\nHost: {api}\r\n\r\n");
    let started = Instant::now();
    let mut cut = false;
    for (i, b) in request_bytes.bytes().enumerate() {
        if slow.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        // Others are answered promptly while the slow client dribbles (first ~5 s).
        if i < 5 {
            let t = Instant::now();
            let (status, body) = request(api, &request_bytes);
            assert_eq!(status, 200, "{body}");
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t.elapsed()
            );
            let t = Instant::now();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
                .args(["ctl", "--api", &api.to_string(), "cluster", "status"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "ctl took {:?}",
                t.elapsed()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    // Cut after the 10 s read deadline (a write may still succeed once after the close).
    if !cut {
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        cut = matches!(slow.read(&mut byte), Ok(0) | Err(_));
    }
    assert!(cut, "a slow client kept its connection");
    assert!(
        started.elapsed() < Duration::from_secs(16),
        "cut only after {:?}",
        started.elapsed()
    );
}

#[test]
fn connections_past_the_cap_get_503_and_the_api_recovers() {
    let (_broker, api) = broker_with_api();
    // 64 connections that send nothing hold every slot.
    let idle: Vec<TcpStream> = (0..64).map(|_| connect(api)).collect();
    let get = format!("GET /api/v5/stats HTTP/1.1\r\nHost: {api}\r\n\r\n");
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = connect(api);
        let _ = s.write_all(get.as_bytes());
        match read_answer(&mut s) {
            Some((503, body)) => {
                assert!(body.contains("SERVICE_UNAVAILABLE"), "{body}");
                break;
            }
            // The accept loop may not have taken all 64 yet.
            other => assert!(Instant::now() < deadline, "no 503 at the cap: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(idle);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = connect(api);
        let _ = s.write_all(get.as_bytes());
        match read_answer(&mut s) {
            Some((200, _)) => break,
            other => assert!(Instant::now() < deadline, "not recovered: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cross_origin_post_is_refused_and_a_same_origin_or_plain_one_works() {
    let (_broker, api) = broker_with_api();
    let target = JoinTarget::new();
    for headers in [
        "Origin: http://evil.example\r\n".to_string(),
        "Origin: null\r\n".to_string(),
        format!("Origin: http://127.0.0.1:{}\r\n", api.port() + 1),
        "Sec-Fetch-Site: cross-site\r\n".to_string(),
    ] {
        let (status, body) = post(api, &target.join_path(), &headers);
        assert_eq!(status, 403, "{headers}: {body}");
        assert!(body.contains("\"code\":\"FORBIDDEN\""), "{body}");
    }
    assert!(
        !target.dialled_within(Duration::from_secs(1)),
        "a cross-origin join was executed"
    );
    // A page served by the API itself (same origin).
    let (status, body) = post(
        api,
        &target.join_path(),
        &format!("Origin: http://{api}\r\nSec-Fetch-Site: same-origin\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(target.dialled_within(WAIT));
    // shardmq ctl sends no Origin.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["ctl", "--api", &api.to_string(), "cluster", "join"])
        .arg(format!(
            "127.0.0.1:{}",
            target.0.local_addr().unwrap().port()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(target.dialled_within(WAIT));
    // Reads need no guard: a browser does not show a foreign page the answer.
    let (status, _) = request(
        api,
        &format!(
            "GET /api/v5/stats HTTP/1.1\r\nHost: {api}\r\nOrigin: http://evil.example\r\n\r\n"
        ),
    );
    assert_eq!(status, 200);
}
