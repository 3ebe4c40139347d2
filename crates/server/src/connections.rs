//! Accepted connections, bounded: at most `max_connections` open at once (a connection beyond
//! it is closed as it is accepted, and counted), each under a [`Deadline`].
//!
//! - gRPC clients must send their first [`HANDSHAKE_BYTES`] bytes, the length of HTTP/2's
//!   connection preface (a TLS client hello is longer), within `handshake_timeout_ms`: one byte,
//!   then silence, would otherwise hold a connection for good. An open gRPC channel that is idle
//!   after its handshake is normal and stays (HTTP/2 keepalive pings drop dead peers).
//! - The metrics endpoint's HTTP/1 clients (scrapers, load-balancer health checks) are closed
//!   after [`METRICS_IDLE_TIMEOUT`] without traffic and after [`METRICS_LIFETIME`] in any case,
//!   and at most [`METRICS_MAX_CONNECTIONS`] are open at once, within the descriptors
//!   [`fit_to_descriptors`] keeps for it.
//!
//! An idle TCP connection costs the server a file descriptor and nothing else, so without a bound
//! a client opening about a thousand of them, sending nothing, used up the descriptors that
//! reloads, leases and the metrics endpoint need (a hostile-client audit, session 21).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a client must send within the handshake timeout: HTTP/2's connection preface.
const HANDSHAKE_BYTES: usize = 24;

/// Connections the metrics endpoint holds at once: scrapers and health checks, a handful.
pub const METRICS_MAX_CONNECTIONS: usize = 64;

/// How long a metrics connection may stay silent: longer than a request takes to arrive, shorter
/// than a hostile client would like. A scraper that keeps its connection between scrapes opens
/// a new one.
pub const METRICS_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a metrics connection may stay open at all, however busy.
pub const METRICS_LIFETIME: Duration = Duration::from_secs(120);

/// Descriptors kept for everything but client connections: the model and index files a reload
/// opens, the event log, leases, the metrics endpoint's
/// [`METRICS_MAX_CONNECTIONS`], libtorch and FAISS.
const RESERVED_DESCRIPTORS: u64 = 256;

/// `max_connections`, lowered to what the process's descriptor limit leaves after
/// [`RESERVED_DESCRIPTORS`], after raising the soft limit to the hard one (as Go's runtime does:
/// the soft limit of 1,024 is a default for `select`, which nothing here uses).
pub fn fit_to_descriptors(max_connections: usize) -> usize {
    let limit = raise_descriptor_limit();
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    let fitted = (max_connections as u64).min(room) as usize;
    if fitted < max_connections {
        tracing::warn!(
            max_connections,
            descriptors = limit,
            fitted,
            "max_connections lowered to what the open-file limit leaves (raise `ulimit -n`)"
        );
    }
    fitted
}

/// Raises the soft open-file limit to the hard one; returns the soft limit in force.
fn raise_descriptor_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return u64::MAX;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// How long a connection may leave a read or a write waiting before it is closed.
#[derive(Debug, Clone, Copy)]
pub enum Deadline {
    /// The first `bytes` must come within `timeout`; after that, silence is the client's
    /// business (an idle gRPC channel, which HTTP/2 keepalive pings watch).
    Opening { bytes: usize, timeout: Duration },
    /// Some traffic, either way, at least every `idle`, and closed after `lifetime` however
    /// busy: for HTTP/1 clients (scrapers, health checks), which open a new connection when they
    /// need one. The lifetime stops a client that dribbles a byte now and then, or sends
    /// requests and never reads the answers, from holding its place for good.
    Idle { idle: Duration, lifetime: Duration },
}

impl Deadline {
    /// The gRPC listener's rule: HTTP/2's preface within `timeout`.
    pub fn handshake(timeout: Duration) -> Deadline {
        Deadline::Opening {
            bytes: HANDSHAKE_BYTES,
            timeout,
        }
    }

    fn timeout(self) -> Duration {
        match self {
            Deadline::Opening { timeout, .. } => timeout,
            Deadline::Idle { idle, .. } => idle,
        }
    }
}

/// What a [`BoundedListener`] reports: connections open now, and those closed as they were
/// accepted because `max_connections` were open.
#[derive(Clone)]
pub struct ConnectionGauges {
    pub open: IntGauge,
    pub refused: IntCounter,
}

/// A listener that hands out at most `max_connections` connections at once, each under a
/// [`Deadline`]. Accept errors (out of descriptors, a connection reset before it was taken)
/// are logged and waited out, never the end of the listener: the server keeps serving the
/// connections it has.
pub struct BoundedListener {
    listener: TcpListener,
    max_connections: usize,
    deadline: Deadline,
    open: Arc<AtomicUsize>,
    gauges: ConnectionGauges,
}

impl BoundedListener {
    pub fn new(
        listener: TcpListener,
        max_connections: usize,
        deadline: Deadline,
        gauges: ConnectionGauges,
    ) -> BoundedListener {
        BoundedListener {
            listener,
            max_connections,
            deadline,
            open: Arc::new(AtomicUsize::new(0)),
            gauges,
        }
    }

    /// The next connection within the bound.
    pub async fn next_conn(&mut self) -> (Conn, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if self.open.load(Ordering::Acquire) >= self.max_connections {
                self.gauges.refused.inc();
                drop(stream);
                continue;
            }
            // TCP_NODELAY: without it, small responses wait for the peer's delayed ACK
            // (~40 ms on Linux), which measured as a 48 ms p50 against 6 ms in the handler.
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                inner: stream,
                deadline: self.deadline,
                timer: Some(Box::pin(tokio::time::sleep(self.deadline.timeout()))),
                closes_at: match self.deadline {
                    Deadline::Idle { lifetime, .. } => Some(Box::pin(tokio::time::sleep(lifetime))),
                    Deadline::Opening { .. } => None,
                },
                received: 0,
                _slot: Slot::take(self.open.clone(), self.gauges.open.clone()),
            };
            return (conn, peer);
        }
    }

    /// The connections as tonic takes them.
    pub fn into_incoming(self) -> impl Stream<Item = io::Result<Conn>> {
        futures_util::stream::unfold(self, |mut listener| async move {
            let (conn, _) = listener.next_conn().await;
            Some((Ok(conn), listener))
        })
    }
}

/// The metrics endpoint (axum) takes its connections through the same bound.
impl axum::serve::Listener for BoundedListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        self.next_conn().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// One open connection's place under `max_connections`, given back when the server drops it.
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl Slot {
    fn take(open: Arc<AtomicUsize>, gauge: IntGauge) -> Slot {
        open.fetch_add(1, Ordering::AcqRel);
        gauge.inc();
        Slot { open, gauge }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// A client connection: a TCP stream whose reads and writes fail once its [`Deadline`] has
/// passed (checked whenever one would wait).
pub struct Conn {
    inner: TcpStream,
    deadline: Deadline,
    /// While the deadline applies: gone once an opening's bytes have come.
    timer: Option<Pin<Box<Sleep>>>,
    /// The end of an idle-bounded connection's lifetime.
    closes_at: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far, counted up to an opening's length.
    received: usize,
    _slot: Slot,
}

impl Conn {
    /// Notes `n` bytes of traffic: an opening may be complete, an idle timer starts again.
    fn traffic(&mut self, n: usize, read: bool) {
        if n == 0 {
            return;
        }
        match self.deadline {
            Deadline::Opening { bytes, .. } => {
                if read {
                    self.received += n;
                    if self.received >= bytes {
                        self.timer = None;
                    }
                }
            }
            Deadline::Idle { idle, .. } => {
                if let Some(timer) = self.timer.as_mut() {
                    timer.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
        }
    }

    /// The error to end the connection with, if a deadline has passed; otherwise the timers
    /// are registered to wake the task when one does.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let passed = |t: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>| {
            t.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready())
        };
        let why = if passed(&mut self.closes_at, cx) {
            "the connection reached its maximum lifetime"
        } else if passed(&mut self.timer, cx) {
            match self.deadline {
                Deadline::Opening { .. } => {
                    "the client did not begin HTTP/2 or TLS within handshake_timeout_ms"
                }
                Deadline::Idle { .. } => "the connection was idle past its timeout",
            }
        } else {
            return None;
        };
        Some(io::Error::new(io::ErrorKind::TimedOut, why))
    }

    /// `poll` of the inner stream, failed instead of waiting once a deadline has passed.
    fn waiting<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending => match self.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            let n = buf.filled().len() - before;
            this.traffic(n, true);
        }
        this.waiting(cx, read)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.traffic(n, false);
        }
        this.waiting(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.traffic(n, false);
        }
        this.waiting(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        this.waiting(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    fn gauges() -> ConnectionGauges {
        ConnectionGauges {
            open: IntGauge::new("open", "open").unwrap(),
            refused: IntCounter::new("refused", "refused").unwrap(),
        }
    }

    fn bounded(
        l: TcpListener,
        max: usize,
        deadline: Deadline,
        gauges: &ConnectionGauges,
    ) -> Pin<Box<impl Stream<Item = io::Result<Conn>>>> {
        Box::pin(BoundedListener::new(l, max, deadline, gauges.clone()).into_incoming())
    }

    #[tokio::test]
    async fn connections_past_max_connections_are_closed_and_counted() {
        let (l, addr) = listener().await;
        let metrics = gauges();
        let mut conns = bounded(l, 2, Deadline::handshake(Duration::from_secs(60)), &metrics);
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _second = conns.next().await.unwrap().unwrap();
        assert_eq!(metrics.open.get(), 2);
        // A third is accepted and closed: its peer reads end-of-file.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(300), conns.next()).await;
        assert!(next.is_err(), "no third connection is handed to the server");
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).await.unwrap_or(0), 0);
        assert_eq!(metrics.refused.get(), 1);
        // Closing one makes room again.
        drop(first);
        assert_eq!(metrics.open.get(), 1);
        let _d = TcpStream::connect(addr).await.unwrap();
        conns.next().await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
        let (l, addr) = listener().await;
        let mut conns = bounded(
            l,
            8,
            Deadline::handshake(Duration::from_millis(200)),
            &gauges(),
        );
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // One byte, then silence, is no handshake either.
        let mut dribbler = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        dribbler.write_all(b"P").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // One that sends its preface in time is read as usual, and later silences are its own
        // business (an idle gRPC channel).
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        talker
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut preface = [0u8; 24];
        conn.read_exact(&mut preface).await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(400), conn.read(&mut buf)).await;
        assert!(quiet.is_err(), "no timeout after the handshake");
    }

    #[tokio::test]
    async fn a_metrics_connection_left_idle_is_closed_and_one_in_use_is_not() {
        let (l, addr) = listener().await;
        let mut conns = bounded(
            l,
            8,
            Deadline::Idle {
                idle: Duration::from_millis(300),
                lifetime: Duration::from_secs(60),
            },
            &gauges(),
        );
        // A client that talks every 100 ms outlives several timeouts...
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            talker.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
            conn.write_all(b"y").await.unwrap();
        }
        // ...and is closed once it falls silent.
        let started = std::time::Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn a_metrics_client_that_dribbles_or_never_reads_is_closed_all_the_same() {
        let (l, addr) = listener().await;
        let idle = Deadline::Idle {
            idle: Duration::from_millis(300),
            lifetime: Duration::from_millis(800),
        };
        let mut conns = bounded(l, 8, idle, &gauges());
        // A byte every 100 ms keeps it from being idle, not from its lifetime.
        let mut dribbler = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 8];
        let dribbled = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                dribbler.write_all(b"G").await.unwrap();
                match conn.read(&mut buf).await {
                    Ok(n) => assert_eq!(n, 1),
                    Err(e) => break e,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let err = dribbled.expect("the dribbler was closed, not kept");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(700));
        // A client that asks and never reads: the answer's write waits on a full socket, and
        // fails once the connection has been idle too long.
        let _deaf = TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let answer = vec![0u8; 64 << 20];
        let written = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&answer)).await;
        let err = written.expect("the write gave up, not hung").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
