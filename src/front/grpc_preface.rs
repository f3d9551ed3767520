//! gRPC connections that never start: a client that opens a connection and does not send
//! its HTTP/2 preface holds it for ever (hyper waits for the preface with no timer, and the
//! keepalive pings that find dead clients start only after it). Each accepted socket reads
//! its preface and first frame header within the header-read timeout, or is closed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The client preface (24 bytes) and the header of the SETTINGS frame that must follow it.
const PREFACE_BYTES: usize = 24 + 9;

/// The accepted gRPC sockets, each with its preface deadline.
pub struct Incoming {
    inner: TcpIncoming,
    limit: Duration,
}

impl Incoming {
    pub fn new(inner: TcpIncoming, limit: Duration) -> Incoming {
        Incoming { inner, limit }
    }
}

impl futures_core::Stream for Incoming {
    type Item = std::io::Result<PrefaceTimed>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let limit = self.limit;
        Pin::new(&mut self.inner).poll_next(cx).map(|accepted| {
            accepted.map(|stream| {
                stream.map(|inner| PrefaceTimed {
                    inner,
                    read: 0,
                    deadline: Some(Box::pin(tokio::time::sleep(limit))),
                })
            })
        })
    }
}

/// A socket that fails its reads with `TimedOut` if the preface has not come in time.
pub struct PrefaceTimed {
    inner: TcpStream,
    read: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Connected for PrefaceTimed {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for PrefaceTimed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(deadline) = &mut this.deadline else {
            return polled;
        };
        this.read += buf.filled().len() - before;
        if this.read >= PREFACE_BYTES {
            this.deadline = None;
            return polled;
        }
        if polled.is_pending() && deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!("closing a gRPC connection that sent no HTTP/2 preface in time");
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        polled
    }
}

impl AsyncWrite for PrefaceTimed {
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
