//! Bytes read off a connection before hyper owns it, given back first: the few
//! bytes read to tell HTTP/2's prior-knowledge preface from an HTTP/1 request, and
//! the pipelined bytes a parked HTTP/1 connection's hyper state had read ahead (see
//! `connection`).

use bytes::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a cleartext client sends first when it speaks HTTP/2 without asking (RFC
/// 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Reads until the first bytes either are HTTP/2's whole preface or stop matching it,
/// the way hyper-util's protocol detection does: an HTTP/1 client costs one read of at
/// most 24 bytes. The bytes read come back, to be replayed through [`Prefixed`]. An
/// early end of stream is HTTP/1's: hyper then closes quietly, or answers the half
/// request it got.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<(Protocol, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 || buf[filled..filled + n] != H2_PREFACE[filled..filled + n] {
            filled += n;
            return Ok((Protocol::Http1, Bytes::copy_from_slice(&buf[..filled])));
        }
        filled += n;
    }
    Ok((Protocol::Http2, Bytes::copy_from_slice(&buf)))
}

/// An IO whose reads yield `prefix` before the inner stream's bytes.
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Prefixed { prefix, inner }
    }

    /// The same stream with `prefix` to replay before what it has not read yet.
    pub fn with_prefix(self, prefix: Bytes) -> Self {
        debug_assert!(self.prefix.is_empty(), "a prefix not replayed yet");
        Prefixed {
            prefix,
            inner: self.inner,
        }
    }

    /// Whether some of the prefix is still to be read.
    #[cfg(test)]
    fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // An empty slice of hyper's old read buffer would still hold all of it.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
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
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_prefix_is_read_before_the_stream_and_then_released() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = Prefixed::new(Bytes::from_static(b"hello"), server);
        let mut small = [0u8; 3];
        // Reads smaller than the prefix take it in pieces.
        assert_eq!(io.read(&mut small).await.unwrap(), 3);
        assert_eq!(&small, b"hel");
        assert!(io.has_prefix());
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"lo world");
        assert!(!io.has_prefix());
    }

    #[tokio::test]
    async fn writes_go_straight_to_the_stream() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Prefixed::new(Bytes::from_static(b"unread"), server);
        io.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
        assert!(io.has_prefix());
    }

    #[tokio::test]
    async fn detection_tells_the_h2_preface_from_http1_and_keeps_the_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        let (protocol, read) = detect(&mut server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        // One read, however much it brought: HTTP/1 needs no more to be told apart.
        assert!(b"POST / HTTP/1.1\r\n".starts_with(&read));

        let (mut client, mut server) = tokio::io::duplex(64);
        // In pieces, as a slow client sends it.
        let sending = tokio::spawn(async move {
            for piece in H2_PREFACE.chunks(5) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let (protocol, read) = detect(&mut server).await.unwrap();
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(&read[..], &H2_PREFACE[..]);
        drop(sending.await.unwrap());

        // A client that says "PR" and leaves is served (and closed) as HTTP/1.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PR").await.unwrap();
        drop(client);
        let (protocol, read) = detect(&mut server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(&read[..], b"PR");
    }
}
