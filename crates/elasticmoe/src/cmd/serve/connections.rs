//! The connection layer of `serve`: accepting sockets under connection caps, reading HTTP/1.1
//! requests under timeouts and size limits, handing them to the router, writing responses, and
//! closing connections on drain.
//!
//! It owns every limit a network client can push against, so that a client can hold at most one
//! connection slot, [`FramingLimits::max_head_bytes`] of buffered head and one body for bounded
//! times:
//!
//! - **Timeouts.** A request head must arrive within `header_timeout` of the connection opening
//!   (or of its first byte, on a kept-alive connection); a body within `body_timeout` of its head;
//!   a kept-alive connection may sit idle for `keep_alive_timeout`; a write that makes no progress
//!   for `write_timeout` ends the connection (and so cancels its generation). A stream that keeps
//!   producing tokens is never cut off.
//! - **Caps.** At most `max_connections` connections, and `max_connections_per_client` from one
//!   address. Past either cap a connection takes one of `reserved_connections` control slots
//!   (at most a quarter of them per address), where only `/health`, `/ready`, `/metrics` and
//!   `/admin/*` are answered, one request per connection; everything else there gets 503. With
//!   the control slots full too, the connection is answered 503 at once and closed.
//! - **Every refusal is JSON.** Malformed heads (400), oversized bodies (413), targets (414) and
//!   heads (431), slow heads and bodies (408) and connection caps (503) get the OpenAI error body.
//!
//! The router never sees any of this: it gets a complete request with a [`ClientAddr`]
//! extension.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, Request, Response, Uri};
use axum::Router;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};

use super::audit::AUDIT;
use super::http1::{self, BodyFraming, ChunkedDecoder, FramingLimits, RequestHead};
use super::openai::ApiError;

/// Connection caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections from one client address.
    pub max_connections_per_client: usize,
    /// Control slots beyond the caps (health, readiness, metrics and admin only).
    pub reserved_connections: usize,
}

/// Everything the connection layer is configured with.
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    /// Time for a request head to arrive.
    pub header_timeout: Duration,
    /// Time for a request body to arrive, from the end of its head.
    pub body_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub keep_alive_timeout: Duration,
    /// Time a response write may make no progress.
    pub write_timeout: Duration,
    /// Size limits of one request.
    pub framing: FramingLimits,
    /// Connection caps.
    pub caps: ConnectionCaps,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(30),
            framing: FramingLimits::default(),
            caps: ConnectionCaps {
                max_connections: 1024,
                max_connections_per_client: 256,
                reserved_connections: 32,
            },
        }
    }
}

/// The client address of a request (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Which slot a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// A normal slot: any request, keep-alive.
    Normal,
    /// A control slot: health, readiness, metrics and admin only, one request.
    Control,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client holds `max_connections_per_client` connections (and its share of control
    /// slots).
    PerClient,
    /// The server holds `max_connections` connections and every control slot.
    Total,
}

impl Refusal {
    /// A label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerClient => "per_client",
            Refusal::Total => "total",
        }
    }
}

/// Counters of the connection layer, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicU64,
    control_open: AtomicU64,
    accepted: AtomicU64,
    rejected_per_client: AtomicU64,
    rejected_total: AtomicU64,
    header_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    idle_closed: AtomicU64,
    write_timeouts: AtomicU64,
    accept_errors: AtomicU64,
}

/// A snapshot of [`ConnectionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// Connections open now (control slots included).
    pub open: u64,
    /// Control slots in use now.
    pub control_open: u64,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Connections refused at the per-client cap.
    pub rejected_per_client: u64,
    /// Connections refused at the overall cap.
    pub rejected_total: u64,
    /// Heads that did not arrive in time (408).
    pub header_timeouts: u64,
    /// Bodies that did not arrive in time (408).
    pub body_timeouts: u64,
    /// Idle connections closed by the keep-alive or header timeout before sending anything.
    pub idle_closed: u64,
    /// Connections closed because a write made no progress.
    pub write_timeouts: u64,
    /// Failed `accept` calls (for example out of descriptors).
    pub accept_errors: u64,
}

impl ConnectionStats {
    /// The counts now.
    pub fn snapshot(&self) -> ConnectionCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConnectionCounts {
            open: g(&self.open),
            control_open: g(&self.control_open),
            accepted: g(&self.accepted),
            rejected_per_client: g(&self.rejected_per_client),
            rejected_total: g(&self.rejected_total),
            header_timeouts: g(&self.header_timeouts),
            body_timeouts: g(&self.body_timeouts),
            idle_closed: g(&self.idle_closed),
            write_timeouts: g(&self.write_timeouts),
            accept_errors: g(&self.accept_errors),
        }
    }

    fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Slots {
    normal: usize,
    control: usize,
    /// address → (normal, control) slots.
    per_client: HashMap<IpAddr, (usize, usize)>,
}

/// The connection slots: who holds how many.
#[derive(Debug)]
pub struct ConnectionTable {
    caps: ConnectionCaps,
    slots: Mutex<Slots>,
    stats: Arc<ConnectionStats>,
}

/// One held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    table: Arc<ConnectionTable>,
    ip: IpAddr,
    tier: Tier,
}

impl ConnectionTable {
    /// A table with `caps`, counting into `stats`.
    pub fn new(caps: ConnectionCaps, stats: Arc<ConnectionStats>) -> Arc<ConnectionTable> {
        Arc::new(ConnectionTable {
            caps,
            slots: Mutex::new(Slots::default()),
            stats,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot for a connection from `ip`, or says why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut g = self.lock();
        let (normal, control) = g.per_client.get(&ip).copied().unwrap_or((0, 0));
        let control_share = (self.caps.reserved_connections / 4).max(1);
        let tier = if g.normal < self.caps.max_connections
            && normal < self.caps.max_connections_per_client
        {
            g.normal += 1;
            Tier::Normal
        } else if g.control < self.caps.reserved_connections && control < control_share {
            g.control += 1;
            ConnectionStats::bump(&self.stats.control_open);
            Tier::Control
        } else if normal >= self.caps.max_connections_per_client {
            return Err(Refusal::PerClient);
        } else {
            return Err(Refusal::Total);
        };
        let entry = g.per_client.entry(ip).or_default();
        match tier {
            Tier::Normal => entry.0 += 1,
            Tier::Control => entry.1 += 1,
        }
        ConnectionStats::bump(&self.stats.open);
        Ok(Slot {
            table: Arc::clone(self),
            ip,
            tier,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.table.lock();
        match self.tier {
            Tier::Normal => g.normal -= 1,
            Tier::Control => {
                g.control -= 1;
                self.table
                    .stats
                    .control_open
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(e) = g.per_client.get_mut(&self.ip) {
            match self.tier {
                Tier::Normal => e.0 = e.0.saturating_sub(1),
                Tier::Control => e.1 = e.1.saturating_sub(1),
            }
            if *e == (0, 0) {
                g.per_client.remove(&self.ip);
            }
        }
        self.table.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Paths a control slot answers.
pub fn is_control_path(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics") || path.starts_with("/admin/")
}

/// The whole HTTP response for an error, JSON body included, closing the connection.
pub fn error_bytes(e: &ApiError) -> Vec<u8> {
    let body = e.body().to_string();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        e.status,
        http1::reason(e.status),
        body.len()
    );
    if matches!(e.status, 429 | 503) {
        out.push_str("retry-after: 1\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

struct Ctx {
    app: Router,
    config: HttpConfig,
    stats: Arc<ConnectionStats>,
    drain: watch::Receiver<bool>,
}

/// The accept loop and its connections.
#[derive(Debug)]
pub struct HttpServer {
    drain: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Serves `app` on `listener` until [`HttpServer::stop`].
    pub fn spawn(
        listener: TcpListener,
        app: Router,
        config: HttpConfig,
        stats: Arc<ConnectionStats>,
    ) -> HttpServer {
        let (drain, drain_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let table = ConnectionTable::new(config.caps, Arc::clone(&stats));
        let ctx = Arc::new(Ctx {
            app,
            config,
            stats,
            drain: drain_rx,
        });
        let task = tokio::spawn(accept_loop(listener, table, ctx, stop_rx));
        HttpServer { drain, stop, task }
    }

    /// Starts the drain: idle kept-alive connections close, half-sent request heads get 503,
    /// and every response from now on closes its connection. The listener keeps answering
    /// (so `/ready` can say 503).
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Stops accepting, gives open connections `grace` to finish their response, then closes
    /// every one of them.
    pub async fn stop(self, grace: Duration) {
        self.drain.send_replace(true);
        self.stop.send_replace(true);
        let _ = timeout(grace + Duration::from_secs(1), self.task).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    table: Arc<ConnectionTable>,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let mut last_accept_error: Option<Instant> = None;
    let lingering = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        while tasks.try_join_next().is_some() {}
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                ConnectionStats::bump(&ctx.stats.accept_errors);
                let now = Instant::now();
                if last_accept_error.is_none_or(|t| now - t > Duration::from_secs(1)) {
                    tracing::error!(target: AUDIT, event = "accept_failed", error = %e,
                        "accepting a connection failed; retrying in 50 ms");
                    last_accept_error = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        ConnectionStats::bump(&ctx.stats.accepted);
        match table.admit(peer.ip()) {
            Ok(slot) => {
                tasks.spawn(connection(sock, peer, slot, Arc::clone(&ctx)));
            }
            Err(refusal) => {
                match refusal {
                    Refusal::PerClient => ConnectionStats::bump(&ctx.stats.rejected_per_client),
                    Refusal::Total => ConnectionStats::bump(&ctx.stats.rejected_total),
                }
                tracing::warn!(target: AUDIT, event = "connection_rejected", client = %peer.ip(),
                    reason = refusal.as_str(), open = ctx.stats.snapshot().open,
                    "connection refused at the connection cap");
                let e = ApiError::with_status(
                    503,
                    "unavailable",
                    match refusal {
                        Refusal::PerClient => {
                            "too many connections from your address; close some and retry"
                        }
                        Refusal::Total => "the server is at its connection limit; retry shortly",
                    },
                );
                // The answer fits the empty send buffer, so writing it never waits. A few
                // refused sockets linger briefly (reading what the client sent, so that closing
                // does not reset the answer away); past that the socket closes at once, so that
                // refusals hold at most REFUSALS_LINGERING descriptors.
                let _ = sock.try_write(&error_bytes(&e));
                if lingering.load(Ordering::Relaxed) < REFUSALS_LINGERING {
                    lingering.fetch_add(1, Ordering::Relaxed);
                    let count = Arc::clone(&lingering);
                    tokio::spawn(async move {
                        linger(sock, Duration::from_millis(200)).await;
                        count.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        }
    }
    drop(listener);
    let grace = ctx.config.write_timeout.min(Duration::from_secs(1));
    let _ = timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// What reading a head gave.
enum HeadRead {
    Head(Box<RequestHead>, Uri),
    /// Close without answering (the peer left, or an idle connection timed out or drained).
    Close,
    /// Answer this and close.
    Refuse(ApiError),
}

/// A small read buffer, kept off the connection future (it lives across awaits).
const READ_CHUNK: usize = 4096;

/// Refused connections that may linger at once (within the descriptor budget's slack).
pub const REFUSALS_LINGERING: usize = 16;

async fn connection(mut sock: TcpStream, peer: SocketAddr, slot: Slot, ctx: Arc<Ctx>) {
    let _ = sock.set_nodelay(true);
    let tier = slot.tier;
    let mut drain = ctx.drain.clone();
    let mut buf: Vec<u8> = Vec::new();
    let mut served = 0usize;
    loop {
        let (head, uri) = match read_head(&mut sock, &mut buf, served, &ctx, &mut drain).await {
            HeadRead::Head(h, u) => (h, u),
            HeadRead::Close => return,
            HeadRead::Refuse(e) => return refuse(sock, &e).await,
        };
        served += 1;
        if tier == Tier::Control && !is_control_path(head.path()) {
            let e = ApiError::with_status(
                503,
                "unavailable",
                "the server is at its connection limit: this connection may only reach /health, \
                 /ready, /metrics and /admin; retry shortly",
            );
            return refuse(sock, &e).await;
        }
        let body = match read_body(&mut sock, &mut buf, &head, &ctx).await {
            Ok(b) => b,
            Err(None) => return,
            Err(Some(e)) => return refuse(sock, &e).await,
        };
        let keep_alive = head.keep_alive && tier == Tier::Normal && !*drain.borrow();
        let head_only = head.method == Method::HEAD;
        let mut req = Request::new(Body::from(body));
        *req.method_mut() = head.method;
        *req.uri_mut() = uri;
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        req.extensions_mut().insert(ClientAddr(peer.ip()));
        let Some(resp) = call(&ctx, &mut sock, &mut buf, req).await else {
            return;
        };
        match write_response(&mut sock, &mut buf, resp, head_only, keep_alive, &ctx).await {
            Some(true) if !*drain.borrow() => {}
            Some(_) => {
                let _ = sock.shutdown().await;
                return;
            }
            None => return,
        }
    }
}

async fn read_head(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    served: usize,
    ctx: &Ctx,
    drain: &mut watch::Receiver<bool>,
) -> HeadRead {
    let cfg = &ctx.config;
    let mut scratch = vec![0u8; READ_CHUNK];
    // A fresh connection has `header_timeout` from its start; a kept-alive one may idle for
    // `keep_alive_timeout`, then has `header_timeout` from its first byte.
    let mut started = !buf.is_empty();
    let mut deadline = Instant::now()
        + if served == 0 || started {
            cfg.header_timeout
        } else {
            cfg.keep_alive_timeout
        };
    // A drain that began before this request did is not this request's business.
    let mut drain_seen = *drain.borrow() && !started;
    loop {
        if !buf.is_empty() {
            match http1::parse_head(buf, &cfg.framing) {
                Ok(Some((head, used))) => {
                    buf.drain(..used);
                    return match head.target.parse::<Uri>() {
                        Ok(uri) => HeadRead::Head(Box::new(head), uri),
                        Err(_) => HeadRead::Refuse(ApiError::bad(
                            None,
                            format!("the request target {:?} is not a valid URI", head.target),
                        )),
                    };
                }
                Ok(None) => {}
                Err(e) => {
                    return HeadRead::Refuse(ApiError::with_status(
                        e.status(),
                        "invalid_request_error",
                        e.to_string(),
                    ))
                }
            }
        }
        let read = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d), if !drain_seen => {
                if started {
                    return HeadRead::Refuse(ApiError::with_status(
                        503,
                        "unavailable",
                        "the server is shutting down",
                    ));
                }
                if served > 0 {
                    return HeadRead::Close;
                }
                drain_seen = true;
                continue;
            }
            r = timeout_at(deadline, sock.read(&mut scratch)) => r,
        };
        match read {
            Err(_) if !started => {
                ConnectionStats::bump(&ctx.stats.idle_closed);
                return HeadRead::Close;
            }
            Err(_) => {
                ConnectionStats::bump(&ctx.stats.header_timeouts);
                return HeadRead::Refuse(ApiError::with_status(
                    408,
                    "timeout",
                    format!(
                        "the request head did not arrive within {} ms",
                        cfg.header_timeout.as_millis()
                    ),
                ));
            }
            Ok(Ok(0) | Err(_)) => return HeadRead::Close,
            Ok(Ok(n)) => {
                if !started && served > 0 {
                    deadline = Instant::now() + cfg.header_timeout;
                }
                started = true;
                buf.extend_from_slice(&scratch[..n]);
            }
        }
    }
}

/// Reads the body of `head`; `Err(None)`: the peer left, `Err(Some(e))`: answer `e` and close.
async fn read_body(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &RequestHead,
    ctx: &Ctx,
) -> Result<Bytes, Option<ApiError>> {
    let cfg = &ctx.config;
    let deadline = Instant::now() + cfg.body_timeout;
    let timed_out = || {
        ConnectionStats::bump(&ctx.stats.body_timeouts);
        Some(ApiError::with_status(
            408,
            "timeout",
            format!(
                "the request body did not arrive within {} ms",
                cfg.body_timeout.as_millis()
            ),
        ))
    };
    let mut scratch = vec![0u8; READ_CHUNK];
    let mut chunked = match head.body {
        BodyFraming::Empty => return Ok(Bytes::new()),
        BodyFraming::Length(_) => None,
        BodyFraming::Chunked => Some((ChunkedDecoder::new(cfg.framing.max_body_bytes), Vec::new())),
    };
    if head.expect_continue && buf.is_empty() {
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        match timeout(cfg.write_timeout, sock.write_all(cont)).await {
            Ok(Ok(())) => {}
            _ => return Err(None),
        }
    }
    loop {
        match (&mut chunked, head.body) {
            (None, BodyFraming::Length(n)) if buf.len() >= n => {
                let rest = buf.split_off(n);
                return Ok(Bytes::from(std::mem::replace(buf, rest)));
            }
            (Some((decoder, out)), _) => {
                let used = decoder.decode(buf, out).map_err(|e| {
                    Some(ApiError::with_status(
                        e.status(),
                        "invalid_request_error",
                        e.to_string(),
                    ))
                })?;
                buf.drain(..used);
                if decoder.is_done() {
                    return Ok(Bytes::from(std::mem::take(out)));
                }
            }
            _ => {}
        }
        match timeout_at(deadline, sock.read(&mut scratch)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(0) | Err(_)) => return Err(None),
            Ok(Ok(n)) => buf.extend_from_slice(&scratch[..n]),
        }
    }
}

/// Resolves when the peer has closed its side; bytes it sends meanwhile (a pipelined request)
/// are kept in `buf` up to the head limit, after which it stops reading.
async fn peer_closed(rd: &mut ReadHalf<'_>, buf: &mut Vec<u8>, limit: usize) {
    let mut scratch = vec![0u8; READ_CHUNK];
    loop {
        if buf.len() > limit {
            return std::future::pending().await;
        }
        match rd.read(&mut scratch).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
        }
    }
}

/// Runs the router on `req` in a task of its own (a panic becomes a 500); `None` if the peer
/// left meanwhile (the handler is then dropped, which cancels its generation).
async fn call(
    ctx: &Ctx,
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    req: Request<Body>,
) -> Option<Response<Body>> {
    let mut svc = ctx.app.clone();
    let fut = tower_service::Service::call(&mut svc, req);
    let mut handler = tokio::spawn(fut);
    let (mut rd, _wr) = sock.split();
    let limit = ctx.config.framing.max_head_bytes;
    tokio::select! {
        r = &mut handler => Some(match r {
            Ok(Ok(resp)) => resp,
            Ok(Err(never)) => match never {},
            Err(e) => {
                tracing::error!(event = "handler_failed", error = %e, "a request handler failed");
                let e = ApiError::with_status(
                    500,
                    "server_error",
                    "the server failed while handling this request",
                );
                let mut r = Response::new(Body::from(e.body().to_string()));
                *r.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
        }),
        () = peer_closed(&mut rd, buf, limit) => {
            handler.abort();
            None
        }
    }
}

/// Writes `resp`; `Some(keep_alive)` once written, `None` if the connection is done for.
async fn write_response(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    resp: Response<Body>,
    head_only: bool,
    keep_alive: bool,
    ctx: &Ctx,
) -> Option<bool> {
    use axum::body::HttpBody as _;
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let close_asked = parts.headers.get(header::CONNECTION).is_some_and(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    });
    let keep_alive = keep_alive && !close_asked;
    let bodiless = head_only || status == 204 || status == 304 || (100..200).contains(&status);
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .or_else(|| body.size_hint().exact());
    let chunked = !bodiless && length.is_none();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", http1::reason(status)).as_bytes());
    for (name, value) in &parts.headers {
        if matches!(
            name.as_str(),
            "connection" | "transfer-encoding" | "content-length" | "keep-alive"
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if let Some(n) = length.filter(|_| status != 204 && status != 304) {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let limit = ctx.config.framing.max_head_bytes;
    let write_timeout = ctx.config.write_timeout;
    let (mut rd, mut wr) = sock.split();
    if chunked {
        // A stream's head goes out at once, before its first chunk.
        write_all(&mut wr, &mut out, write_timeout, ctx).await?;
    }
    if !bodiless {
        let mut stream = body.into_data_stream();
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                () = peer_closed(&mut rd, buf, limit) => return None,
            };
            match next {
                None => break,
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => {
                    if chunked {
                        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    } else {
                        out.extend_from_slice(&data);
                    }
                    // A whole small body goes out with its head in one write.
                    if chunked || out.len() >= 16 * 1024 {
                        write_all(&mut wr, &mut out, write_timeout, ctx).await?;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(event = "response_body_failed", error = %e,
                        "a response body failed; closing the connection");
                    return None;
                }
            }
        }
        if chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    write_all(&mut wr, &mut out, write_timeout, ctx).await?;
    Some(keep_alive)
}

async fn write_all(
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    out: &mut Vec<u8>,
    limit: Duration,
    ctx: &Ctx,
) -> Option<()> {
    if out.is_empty() {
        return Some(());
    }
    match timeout(limit, wr.write_all(out)).await {
        Ok(Ok(())) => {
            out.clear();
            Some(())
        }
        Ok(Err(_)) => None,
        Err(_) => {
            ConnectionStats::bump(&ctx.stats.write_timeouts);
            None
        }
    }
}

/// Answers `e`, closes the sending side, and reads (discarding) what the client still sends for
/// a moment, so that closing does not reset the connection before the client reads the answer.
async fn refuse(mut sock: TcpStream, e: &ApiError) {
    let linger = Duration::from_millis(500);
    if timeout(linger, sock.write_all(&error_bytes(e)))
        .await
        .is_err()
    {
        return;
    }
    self::linger(sock, linger).await;
}

/// Closes the sending side, then reads (discarding) what the client still sends for up to
/// `limit` or 1 MiB.
async fn linger(mut sock: TcpStream, limit: Duration) {
    let _ = sock.shutdown().await;
    let deadline = Instant::now() + limit;
    let mut scratch = vec![0u8; READ_CHUNK];
    let mut seen = 0usize;
    while seen < 1 << 20 {
        match timeout_at(deadline, sock.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => seen += n,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(max: usize, per_client: usize, reserved: usize) -> ConnectionCaps {
        ConnectionCaps {
            max_connections: max,
            max_connections_per_client: per_client,
            reserved_connections: reserved,
        }
    }

    #[test]
    fn caps_fill_normal_then_control_slots_then_refuse() {
        let stats = Arc::new(ConnectionStats::default());
        let t = ConnectionTable::new(caps(4, 2, 8), Arc::clone(&stats));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = t.admit(a).unwrap();
        let _a2 = t.admit(a).unwrap();
        assert_eq!((a1.tier, _a2.tier), (Tier::Normal, Tier::Normal));
        // Over its own cap, a client gets control slots, a quarter of them at most.
        let ac: Vec<Slot> = (0..2).map(|_| t.admit(a).unwrap()).collect();
        assert!(ac.iter().all(|s| s.tier == Tier::Control));
        assert_eq!(t.admit(a).unwrap_err(), Refusal::PerClient);
        // Others still get normal slots until the total cap.
        let _b: Vec<Slot> = (0..2).map(|_| t.admit(b).unwrap()).collect();
        let c1 = t.admit(c).unwrap();
        assert_eq!(c1.tier, Tier::Control);
        assert_eq!(stats.snapshot().open, 7);
        assert_eq!(stats.snapshot().control_open, 3);
        drop(a1);
        assert_eq!(
            t.admit(c).unwrap().tier,
            Tier::Normal,
            "a freed slot is reused"
        );
        drop(ac);
        assert_eq!(stats.snapshot().control_open, 1);
        drop(c1);
        assert_eq!(stats.snapshot().control_open, 0);
    }

    #[test]
    fn the_last_control_slots_refuse_with_total() {
        let t = ConnectionTable::new(caps(1, 1, 1), Arc::new(ConnectionStats::default()));
        let ips: Vec<IpAddr> = (1..=3)
            .map(|i| format!("10.0.0.{i}").parse().unwrap())
            .collect();
        let _n = t.admit(ips[0]).unwrap();
        let _c = t.admit(ips[1]).unwrap();
        assert_eq!(_c.tier, Tier::Control);
        assert_eq!(t.admit(ips[2]).unwrap_err(), Refusal::Total);
    }

    /// Serves a small router on loopback and returns what one connection gets for `raw`.
    fn exchange(raw: &[u8]) -> String {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let app = Router::new()
            .route("/ok", axum::routing::get(|| async { "fine" }))
            .route(
                "/boom",
                axum::routing::get(|| async {
                    if std::hint::black_box(true) {
                        panic!("handler bug");
                    }
                    "unreachable"
                }),
            );
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = rt.block_on(async {
            HttpServer::spawn(
                listener,
                app,
                HttpConfig::default(),
                Arc::new(ConnectionStats::default()),
            )
        });
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        rt.block_on(server.stop(Duration::ZERO));
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_panicking_handler_gets_a_500_json_and_pipelined_requests_are_answered_in_order() {
        let out = exchange(
            b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\nHEAD /ok HTTP/1.1\r\n\r\n\
              GET /boom HTTP/1.1\r\nconnection: close\r\n\r\n",
        );
        let ok = out.find("HTTP/1.1 200 OK").unwrap();
        let head = out[ok + 1..].find("HTTP/1.1 200 OK").unwrap() + ok + 1;
        let boom = out.find("HTTP/1.1 500 Internal Server Error").unwrap();
        assert!(ok < head && head < boom, "{out}");
        assert_eq!(out.matches("fine").count(), 1, "HEAD has no body: {out}");
        assert!(out[boom..].contains("\"code\":500"), "{out}");
        assert!(out[boom..].contains("connection: close"), "{out}");
    }

    #[test]
    fn error_responses_are_complete_json_http_messages() {
        let raw = error_bytes(&ApiError::with_status(431, "invalid_request_error", "big"));
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], 431);
    }
}
