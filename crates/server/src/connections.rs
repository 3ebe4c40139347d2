//! Accepted connections, bounded: at most `max_connections` open at once (a connection beyond
//! it is closed as it is accepted, and counted), and each must send its first byte within
//! `handshake_timeout_ms`.
//! What must come in time is the first [`HANDSHAKE_BYTES`] bytes, the length of HTTP/2's
//! connection preface (a TLS client hello is longer): one byte, then silence, would otherwise
//! hold a connection for good.
//!
//! An idle TCP connection costs the server a file descriptor and nothing else, so without a bound
//! a client opening about a thousand of them, sending nothing, used up the descriptors that
//! reloads, leases and the metrics endpoint need (a hostile-client audit, session 21). The bound
//! leaves descriptors for those ([`fit_to_descriptors`]); the timeout closes connections that
//! never begin HTTP/2 or TLS. An open gRPC channel that is idle after its handshake is normal
//! and stays (HTTP/2 keepalive pings drop dead peers).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::Metrics;

/// Bytes a client must send within the handshake timeout: HTTP/2's connection preface.
const HANDSHAKE_BYTES: usize = 24;

/// Descriptors kept for everything but client connections: the model and index files a reload
/// opens, the event log, leases, the metrics endpoint, libtorch and FAISS.
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

/// The listener's connections as tonic takes them, within the bounds. Accept errors (out of
/// descriptors, a connection reset before it was taken) are logged and waited out, never the end
/// of the stream: the server keeps serving the connections it has.
pub fn bounded(
    listener: TcpListener,
    max_connections: usize,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<Conn>> {
    let open = Arc::new(AtomicUsize::new(0));
    futures_util::stream::unfold(listener, move |listener| {
        let (open, metrics) = (open.clone(), metrics.clone());
        async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if open.load(Ordering::Acquire) >= max_connections {
                    metrics.connections_refused.inc();
                    drop(stream);
                    continue;
                }
                // TCP_NODELAY: without it, small responses wait for the peer's delayed ACK
                // (~40 ms on Linux), which measured as a 48 ms p50 against 6 ms in the handler.
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    inner: stream,
                    handshake: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
                    received: 0,
                    _slot: Slot::take(open.clone(), metrics.clone()),
                };
                return Some((Ok(conn), listener));
            }
        }
    })
}

/// One open connection's place under `max_connections`, given back when tonic drops it.
struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Slot {
    fn take(open: Arc<AtomicUsize>, metrics: Arc<Metrics>) -> Slot {
        let now = open.fetch_add(1, Ordering::AcqRel) + 1;
        metrics.connections.set(now as i64);
        Slot { open, metrics }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now = self.open.fetch_sub(1, Ordering::AcqRel) - 1;
        self.metrics.connections.set(now as i64);
    }
}

/// A client connection: a TCP stream whose reads fail if its first [`HANDSHAKE_BYTES`] bytes do
/// not come in time.
pub struct Conn {
    inner: TcpStream,
    /// Until the handshake's bytes have come.
    handshake: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far, counted up to [`HANDSHAKE_BYTES`].
    received: usize,
    _slot: Slot,
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
        let Some(deadline) = this.handshake.as_mut() else {
            return read;
        };
        if let Poll::Ready(Ok(())) = read {
            this.received += buf.filled().len() - before;
            if this.received >= HANDSHAKE_BYTES {
                this.handshake = None;
            }
            return Poll::Ready(Ok(()));
        }
        match read {
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not begin HTTP/2 or TLS within handshake_timeout_ms",
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
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

    #[tokio::test]
    async fn connections_past_max_connections_are_closed_and_counted() {
        let (l, addr) = listener().await;
        let metrics = Arc::new(Metrics::new());
        let mut conns = Box::pin(bounded(l, 2, Duration::from_secs(60), metrics.clone()));
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _second = conns.next().await.unwrap().unwrap();
        assert_eq!(metrics.connections.get(), 2);
        // A third is accepted and closed: its peer reads end-of-file.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(300), conns.next()).await;
        assert!(next.is_err(), "no third connection is handed to the server");
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).await.unwrap_or(0), 0);
        assert_eq!(metrics.connections_refused.get(), 1);
        // Closing one makes room again.
        drop(first);
        assert_eq!(metrics.connections.get(), 1);
        let _d = TcpStream::connect(addr).await.unwrap();
        conns.next().await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
        let (l, addr) = listener().await;
        let metrics = Arc::new(Metrics::new());
        let mut conns = Box::pin(bounded(l, 8, Duration::from_millis(200), metrics));
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
}
