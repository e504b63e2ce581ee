//! The management API's HTTP server: hyper's HTTP/1.1 on a tokio current-thread runtime that
//! lives on the management thread alone (no other runtime in the process; the shards never see
//! it). Each connection is its own task, so a slow client holds one connection slot, never the
//! API.
//!
//! Every request meets these bounds, in this order:
//! 1. a connection slot ([`CONNECTIONS_MAX`]; past it a short 503 and close);
//! 2. request line and headers within [`HEAD_MAX_BYTES`] (else 431, or 414 for the target) and
//!    [`REQUEST_READ_TIMEOUT`] (else the connection is closed);
//! 3. the CSRF guard for state-changing methods (403, see `guard.rs`);
//! 4. the whole body within [`BODY_MAX_BYTES`] (413) and the same read deadline (408);
//!    a body on a state-changing request must be JSON (415);
//! 5. only then the action, on a small blocking pool (it may wait on the cluster thread), at
//!    most [`ACTIONS_MAX`] at once (else 503);
//! 6. one request per connection (`Connection: close`), the whole exchange within
//!    [`CONNECTION_TIMEOUT`].

use super::{guard, routes};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST, ORIGIN};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use shardmq_shards::NodeShared;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Largest request line plus headers, bytes.
pub const HEAD_MAX_BYTES: usize = 16 * 1024;
/// Most header fields in one request.
const HEADERS_MAX: usize = 64;
/// Largest request body, bytes (no route takes more than a small JSON document).
pub const BODY_MAX_BYTES: usize = 1024 * 1024;
/// Time from accepting a connection until its request, head and body, has fully arrived.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the whole exchange: reading, the action (which may wait up to 10 s on the cluster
/// thread) and writing the answer to a client that may read slowly.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; a request past this gets a 503 and its connection is closed.
pub const CONNECTIONS_MAX: usize = 64;
/// Threads that run route actions (which block on the cluster thread's answer).
const ACTION_THREADS_MAX: usize = 4;
/// Actions running or waiting for a thread. An action outlives a connection that timed out
/// (it cannot be cancelled while it waits on the cluster thread), so this, not the connection
/// cap, bounds the queue; past it a 503.
const ACTIONS_MAX: usize = 16;
/// Pause after a failed accept (EMFILE and the like) before the next, so it cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Fetch metadata a browser sends with every request (`same-origin`, `cross-site`, ...).
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

const BUSY_BODY: &str = r#"{"code":"SERVICE_UNAVAILABLE","message":"too many connections"}"#;

/// Serves `listener` until the process ends; builds the runtime on the calling thread.
pub fn run(listener: std::net::TcpListener, shared: Arc<NodeShared>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(ACTION_THREADS_MAX)
        .thread_name("mgmt-api-action")
        .build()?;
    rt.block_on(accept_loop(listener, shared))
}

async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<NodeShared>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let actions = Arc::new(Semaphore::new(ACTIONS_MAX));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("management API: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Best effort: a fresh socket's send buffer takes these few bytes without waiting.
            let busy = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BUSY_BODY}",
                BUSY_BODY.len()
            );
            let _ = stream.try_write(busy.as_bytes());
            continue;
        };
        let (shared, actions) = (shared.clone(), actions.clone());
        tokio::spawn(async move {
            serve(stream, shared, actions).await;
            drop(slot);
        });
    }
}

/// One connection: one request, one answer, close.
async fn serve(stream: tokio::net::TcpStream, shared: Arc<NodeShared>, actions: Arc<Semaphore>) {
    let read_deadline = Instant::now() + REQUEST_READ_TIMEOUT;
    let service = hyper::service::service_fn(move |req| {
        handle(req, shared.clone(), actions.clone(), read_deadline)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_READ_TIMEOUT)
        .max_buf_size(HEAD_MAX_BYTES)
        .max_header_size(HEAD_MAX_BYTES)
        .max_headers(HEADERS_MAX)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("management API connection failed: {e}"),
        Err(_) => log::debug!("management API connection timed out"),
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<NodeShared>,
    actions: Arc<Semaphore>,
    read_deadline: Instant,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let state_changing = guard::is_state_changing(&method);
    let header = |name: HeaderName| req.headers().get(name).map(|v| v.to_str().unwrap_or(""));
    if state_changing {
        let verdict = guard::refusal(header(ORIGIN), header(HOST), header(SEC_FETCH_SITE));
        if let Some(why) = verdict {
            log::warn!("management API: {method} {path} refused: {why}");
            return Ok(error(StatusCode::FORBIDDEN, "FORBIDDEN", why));
        }
    }
    // A declared length past the limit is refused before a byte of the body is read.
    if req.body().size_hint().lower() > BODY_MAX_BYTES as u64 {
        return Ok(too_large());
    }
    let json_body = header(CONTENT_TYPE).is_some_and(|t| {
        t.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
    });
    let body = Limited::new(req.into_body(), BODY_MAX_BYTES).collect();
    let body = match tokio::time::timeout_at(read_deadline, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => return Ok(too_large()),
        Ok(Err(e)) => {
            log::debug!("management API: bad request body: {e}");
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "malformed request body",
            ));
        }
        Err(_) => {
            return Ok(error(
                StatusCode::REQUEST_TIMEOUT,
                "REQUEST_TIMEOUT",
                "the request did not arrive in time",
            ))
        }
    };
    if state_changing && !body.is_empty() && !json_body {
        return Ok(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "a request body must be application/json",
        ));
    }
    // The whole request is here: only now may it act.
    let Ok(action_slot) = actions.try_acquire_owned() else {
        return Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            "too many requests in progress",
        ));
    };
    let action = move || {
        let reply = routes::answer(&shared, &method, &path, &query);
        drop(action_slot);
        reply
    };
    Ok(match tokio::task::spawn_blocking(action).await {
        Ok((status, content_type, body)) => response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            content_type,
            body,
        ),
        Err(e) => {
            log::error!("management API action failed: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "the action failed",
            )
        }
    })
}

fn too_large() -> Response<Full<Bytes>> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        "the request body is larger than 1 MiB",
    )
}

/// An error answer as EMQX shapes it: `{"code": ..., "message": ...}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    debug_assert!(code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
    let body = format!("{{\"code\":\"{code}\",\"message\":{message:?}}}");
    response(status, "application/json", body)
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}
