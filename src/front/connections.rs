//! The HTTP accept loop: hyper connections with the timeouts `axum::serve` does not offer
//! (header read, idle keep-alive, body progress), and the end of the drain, where
//! connections the kernel has already queued are answered 503 instead of reset.
//!
//! Each connection has a watchdog that knows whether a request is in flight (from the
//! service) and when the client last started sending (from the socket). With nothing in
//! flight it closes a connection that has sent nothing for `idle`, or has been sending a
//! request head for `header_read`. A request body that makes no progress for `body_read`
//! fails its read ([`StalledBody`]), which the handlers answer 408.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, Version, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::error::Error;
use crate::front::head_limits;
use crate::front::large_answers::TrimLarge;

/// How long a connection may take, each with its flag (`config`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From a request's first byte to the end of its head.
    pub header_read: Duration,
    /// With no request in flight and nothing sent (keep-alive, or a new connection).
    pub idle: Duration,
    /// Between two pieces of a request body.
    pub body_read: Duration,
}

/// Request heads up to this size reach the app, which answers those over its own limits
/// with a JSON 431 ([`head_limits`]). hyper answers larger heads itself, with an empty 431.
/// The read buffer only grows this large for a head that needs it.
pub const MAX_HEAD_BUFFER: usize = 2 << 20;

/// After the stop, a connection that has sent nothing yet gets this long for its request
/// (a client that connected a moment before has it on the wire); hyper's graceful shutdown
/// would otherwise drop it before reading a byte. It is answered 503.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// At the drain's end the listener closes once nothing has connected for this long.
const QUIET_BEFORE_CLOSE: Duration = Duration::from_millis(100);

/// ... or this long after the drain's end, if connections keep coming.
const LINGER_MAX: Duration = Duration::from_secs(1);

/// An idle HTTP/2 connection is told GOAWAY; one that has not closed this long after is
/// dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stop` turns true. Then the listener stays open until
/// it has been quiet for a moment ([`QUIET_BEFORE_CLOSE`]), every request from then on is
/// answered 503 `not_ready` (with `Connection: close` on HTTP/1), requests in flight
/// finish, and the function returns when every connection has closed.
pub async fn serve(listener: TcpListener, router: Router, timeouts: Timeouts, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Our watchdog times the head (hyper's timer would also close idle keep-alive
        // connections at the header timeout).
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BUFFER);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    // Each connection task holds a sender; recv() returns None once all have finished.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let conn_stop = stop.clone();
    let spawn = |stream: TcpStream| {
        let conn = Connection {
            builder: builder.clone(),
            router: router.clone(),
            timeouts,
            stop: conn_stop.clone(),
            _open: open_tx.clone(),
        };
        tokio::spawn(conn.run(stream));
    };
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn(stream),
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: the listener itself is fine.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Closing the listener resets the connections whose handshake the kernel has already
    // completed, with the requests they sent unanswered; a client can complete one at any
    // moment before the close. So the listener stays open until nothing has connected for
    // QUIET_BEFORE_CLOSE (at most LINGER_MAX): the connections accepted meanwhile are
    // answered 503 and told to close, and a client that got its 503 goes elsewhere instead
    // of connecting again. Only a client connecting in the instant of the close still
    // meets a reset.
    let lingered = Instant::now();
    let mut queued = 0u32;
    loop {
        let left = (lingered + LINGER_MAX).saturating_duration_since(Instant::now());
        match tokio::time::timeout(QUIET_BEFORE_CLOSE.min(left), listener.accept()).await {
            Ok(Ok((stream, _))) => {
                spawn(stream);
                queued += 1;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "accepting a connection during the close failed"),
            Err(_) => break,
        }
        if left.is_zero() {
            break;
        }
    }
    drop(listener);
    tracing::debug!(
        queued,
        "listener closed; the connections made meanwhile were answered 503"
    );
    drop(open_tx);
    let _ = open_rx.recv().await;
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: Router,
    timeouts: Timeouts,
    stop: watch::Receiver<bool>,
    _open: tokio::sync::mpsc::Sender<()>,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        // No Nagle: an answer larger than one segment otherwise waits for the client's
        // delayed ACK.
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Mutex::new(Activity::new()));
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let service = RequestService {
            router: self.router.clone(),
            activity: activity.clone(),
            stop: self.stop.clone(),
            body_read: self.timeouts.body_read,
        };
        let conn = self
            .builder
            .serve_connection(io, hyper_util::service::TowerToHyperService::new(service));
        tokio::pin!(conn);
        // The watchdog also wakes this often while a request is in flight, to see when it ends.
        let period = self.timeouts.idle.min(self.timeouts.header_read);
        let mut stopped_at: Option<Instant> = None;
        let mut shut_down = false;
        let mut idle_close: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let (due, read_any) = {
                let a = activity
                    .lock()
                    .expect("no code panics holding this lock; this is a bug");
                (a.deadline(&self.timeouts), a.read_any)
            };
            if let Some(at) = stopped_at
                && !shut_down
                && (read_any || now >= at + FIRST_REQUEST_GRACE)
            {
                conn.as_mut().graceful_shutdown();
                shut_down = true;
            }
            let mut wake = now + period;
            if let Some(at) = stopped_at
                && !shut_down
            {
                wake = wake.min(at + FIRST_REQUEST_GRACE);
            }
            match (due, idle_close) {
                (_, Some(at)) if now >= at + CLOSE_GRACE => return,
                (_, Some(at)) => wake = wake.min(at + CLOSE_GRACE),
                (Some((at, Expiry::HeaderRead)), None) if now >= at => {
                    tracing::debug!("closing a connection whose request head took too long");
                    return;
                }
                (Some((at, Expiry::Idle)), None) if now >= at => {
                    tracing::debug!("closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    shut_down = true;
                    idle_close = Some(now);
                    continue;
                }
                (Some((at, _)), None) => wake = wake.min(at),
                (None, None) => {}
            }
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep_until(wake) => {}
                _ = stopped(&mut self.stop), if stopped_at.is_none() => stopped_at = Some(Instant::now()),
            }
        }
    }
}

/// What the watchdog knows of a connection.
struct Activity {
    /// Requests whose answer has not been written yet.
    in_flight: usize,
    /// When the last answer was written, or the connection opened.
    idle_since: Instant,
    /// The first byte read since then: a request head has started.
    head_started: Option<Instant>,
    read_any: bool,
}

#[derive(Debug, Clone, Copy)]
enum Expiry {
    HeaderRead,
    Idle,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: 0,
            idle_since: Instant::now(),
            head_started: None,
            read_any: false,
        }
    }

    /// When the connection is to be closed unless something happens; None while a request
    /// is in flight (the body timeout and the request timeout bound it).
    fn deadline(&self, t: &Timeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight > 0 {
            return None;
        }
        Some(match self.head_started {
            Some(at) => (at + t.header_read, Expiry::HeaderRead),
            None => (self.idle_since + t.idle, Expiry::Idle),
        })
    }
}

/// The socket, noting reads for the watchdog.
struct Watched {
    inner: TcpStream,
    activity: Arc<Mutex<Activity>>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let mut a = self
                .activity
                .lock()
                .expect("no code panics holding this lock; this is a bug");
            a.read_any = true;
            if a.in_flight == 0 && a.head_started.is_none() {
                a.head_started = Some(Instant::now());
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request in flight, until its answer's body has been written (or dropped).
struct InFlight(Arc<Mutex<Activity>>);

impl InFlight {
    fn begin(activity: &Arc<Mutex<Activity>>) -> InFlight {
        let mut a = activity
            .lock()
            .expect("no code panics holding this lock; this is a bug");
        a.in_flight += 1;
        a.head_started = None;
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.lock().expect("no code panics holding this lock; this is a bug");
        a.in_flight -= 1;
        if a.in_flight == 0 {
            a.idle_since = Instant::now();
            a.head_started = None;
        }
    }
}

/// Every request of a connection: refused with 503 after the stop, or with a JSON 414 or
/// 431 over the head limits, else given to the router with its body timed.
#[derive(Clone)]
struct RequestService {
    router: Router,
    activity: Arc<Mutex<Activity>>,
    stop: watch::Receiver<bool>,
    body_read: Duration,
}

impl tower::Service<Request<Incoming>> for RequestService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::begin(&self.activity);
        let http1 = request.version() < Version::HTTP_2;
        let refusal = if *self.stop.borrow() {
            Some(Error::NotReady(
                "the server is shutting down; send the request to another replica".into(),
            ))
        } else {
            head_limits::check(&request).err()
        };
        let router = self.router.clone();
        let body_read = self.body_read;
        Box::pin(async move {
            let response = match refusal {
                Some(e) => {
                    let mut response = e.into_response();
                    // HTTP/2 has GOAWAY for this, and forbids the header.
                    if http1 {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    response
                }
                None => {
                    let request = request.map(|body| StalledBody::new(body, body_read));
                    let Ok(response) = router.oneshot(request).await;
                    response
                }
            };
            Ok(response.map(|body| {
                Body::new(Tracked {
                    inner: TrimLarge::new(body),
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// An answer's body, holding its request in flight until written; a large buffer of it
/// trims the heap once freed ([`TrimLarge`]).
struct Tracked {
    inner: TrimLarge<Body>,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails with [`BodyStalled`] when no data comes for its timeout.
pub struct StalledBody {
    inner: Incoming,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StalledBody {
    fn new(inner: Incoming, limit: Duration) -> StalledBody {
        StalledBody {
            inner,
            limit,
            timer: None,
        }
    }
}

/// The error a stalled body's read ends with; the handlers answer it 408
/// (`rest::body_error`).
#[derive(Debug, thiserror::Error)]
#[error("the request body made no progress for {0:?}")]
pub struct BodyStalled(pub Duration);

impl http_body::Body for StalledBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(timer) = &mut this.timer {
                    timer.as_mut().reset(Instant::now() + this.limit);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The timeout, when a body read failed because the body stalled.
pub fn stalled(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(BodyStalled(limit)) = e.downcast_ref::<BodyStalled>() {
            return Some(*limit);
        }
        source = e.source();
    }
    None
}
