//! Gathers what an HTTP/2 connection writes between two flushes, so that a gRPC answer
//! (HEADERS, DATA, trailers) leaves as one TLS record in one `writev` rather than one
//! record and one loopback segment per frame. tokio-rustls seals and sends every write at
//! once; h2 flushes after every pass over its queues, so the flush is the right boundary.
//! tokio's `BufWriter` would not do: it says it takes vectored writes, so h2 chains an
//! answer's DATA and must flush it before the trailers (two records again), and it holds
//! its whole capacity for the life of every connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A write this large goes straight through (after what is gathered): a big body is not
/// copied, and at most this much waits in the buffer.
const GATHER_MAX: usize = 16 * 1024;
/// What the buffer keeps between flushes. A connection whose answers are larger gives the
/// rest back after each flush, so thousands of idle agent connections hold little.
const KEEP: usize = 4 * 1024;

/// A writer that holds writes until the next flush, over any transport (the node API's TLS
/// streams on both ends).
pub struct Gather<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner writer has taken (a flush interrupted by backpressure
    /// goes on from here).
    sent: usize,
}

impl<T> Gather<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
        }
    }

    /// Bytes written but not yet passed on.
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

/// Only the count of bytes held: they are plaintext (credentials among them) on their way
/// into TLS.
impl<T> std::fmt::Debug for Gather<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gather")
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl<T: AsyncWrite + Unpin> Gather<T> {
    /// Passes every gathered byte to the inner writer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        if self.buf.capacity() > KEEP {
            self.buf.shrink_to(KEEP);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gather<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gather<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() > GATHER_MAX {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= GATHER_MAX {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    /// Not vectored, on purpose: h2 then copies a DATA payload under 1 KiB into its own
    /// frame buffer, where a chained one would have to be flushed before the trailers could
    /// be queued; a larger one arrives here as two writes, gathered all the same.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Gather<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Records each write the inner transport is asked for, and may refuse to take more
    /// than `per_write` bytes at once, or be blocked.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        per_write: Option<usize>,
        blocked: bool,
        shut: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = self.per_write.map_or(data.len(), |m| m.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_written_before_a_flush_leave_in_one_write() {
        let mut g = Gather::new(Recorder::default());
        g.write_all(b"HEADERS").await.unwrap();
        g.write_all(b"DATA").await.unwrap();
        g.write_all(b"TRAILERS").await.unwrap();
        assert!(g.inner.writes.is_empty(), "nothing leaves before the flush");
        assert_eq!(g.pending(), 19);
        g.flush().await.unwrap();
        assert_eq!(g.inner.writes, vec![b"HEADERSDATATRAILERS".to_vec()]);
        assert_eq!(g.inner.flushes, 1);
        assert_eq!(g.pending(), 0);
    }

    #[tokio::test]
    async fn a_short_inner_write_is_resumed_where_it_stopped() {
        let mut g = Gather::new(Recorder {
            per_write: Some(3),
            ..Default::default()
        });
        g.write_all(b"abcdefgh").await.unwrap();
        g.flush().await.unwrap();
        assert_eq!(g.inner.writes.concat(), b"abcdefgh");
        assert_eq!(g.inner.writes.len(), 3);
    }

    #[tokio::test]
    async fn a_large_write_passes_through_after_what_was_gathered() {
        let mut g = Gather::new(Recorder::default());
        g.write_all(b"head").await.unwrap();
        let big = vec![7u8; GATHER_MAX];
        g.write_all(&big).await.unwrap();
        // The gathered bytes went first, in order, then the large write itself.
        assert_eq!(g.inner.writes.len(), 2);
        assert_eq!(g.inner.writes[0], b"head");
        assert_eq!(g.inner.writes[1], big);
        assert_eq!(g.pending(), 0);
    }

    #[tokio::test]
    async fn the_buffer_never_holds_more_than_the_limit() {
        let mut g = Gather::new(Recorder::default());
        let chunk = vec![1u8; GATHER_MAX / 2 + 1];
        g.write_all(&chunk).await.unwrap();
        assert!(g.inner.writes.is_empty());
        // The second chunk would overflow the limit, so the first is passed on first.
        g.write_all(&chunk).await.unwrap();
        assert_eq!(g.inner.writes, vec![chunk.clone()]);
        assert_eq!(g.pending(), chunk.len());
    }

    #[test]
    fn a_blocked_transport_holds_the_writer_back_once_the_buffer_is_full() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut g = Gather::new(Recorder {
            blocked: true,
            ..Default::default()
        });
        let chunk = vec![1u8; GATHER_MAX - 1];
        assert!(matches!(
            Pin::new(&mut g).poll_write(&mut cx, &chunk),
            Poll::Ready(Ok(n)) if n == chunk.len()
        ));
        assert!(Pin::new(&mut g).poll_write(&mut cx, b"xy").is_pending());
        assert!(Pin::new(&mut g).poll_flush(&mut cx).is_pending());
        g.inner.blocked = false;
        assert!(Pin::new(&mut g).poll_flush(&mut cx).is_ready());
        assert_eq!(g.inner.writes.concat(), chunk);
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_gathered_first() {
        let mut g = Gather::new(Recorder::default());
        g.write_all(b"last words").await.unwrap();
        g.shutdown().await.unwrap();
        assert_eq!(g.inner.writes, vec![b"last words".to_vec()]);
        assert!(g.inner.shut);
    }

    #[tokio::test]
    async fn a_buffer_grown_by_a_large_answer_is_given_back() {
        let mut g = Gather::new(Recorder::default());
        g.write_all(&vec![0u8; GATHER_MAX - 1]).await.unwrap();
        g.flush().await.unwrap();
        assert!(g.buf.capacity() <= KEEP, "{}", g.buf.capacity());
    }

    #[tokio::test]
    async fn debug_output_shows_no_byte_held() {
        let mut g = Gather::new(Recorder::default());
        g.write_all(b"password=hunter2").await.unwrap();
        assert_eq!(format!("{g:?}"), "Gather { pending: 16, .. }");
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut g = Gather::new(a);
        b.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        g.write_all(b"pong").await.unwrap();
        g.flush().await.unwrap();
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }
}
