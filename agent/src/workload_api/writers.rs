//! Who wrote the bytes on a Workload API connection. The kernel names the process that
//! connected (`SO_PEERCRED`), but a connection is a descriptor: the process can fork and
//! let a child talk on it, or pass it to another process, and that process would then be
//! answered as the one that connected. With `SO_PASSCRED` on the socket, every read also
//! returns the credentials of the process that wrote what was read (the kernel never joins
//! two writers' bytes in one read), so a connection written to by any process other than
//! the one that opened it is noticed before its request is answered.

use std::io;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// No other writer seen yet.
const NONE: i32 = i32::MIN;

/// The first writer other than the connecting process, shared between a connection's
/// stream and its request handler.
#[derive(Debug, Clone)]
pub(crate) struct OtherWriter(Arc<AtomicI32>);

impl OtherWriter {
    /// The pid (0 when the kernel could not name it in the agent's pid namespace) of the
    /// first process other than the connecting one that wrote on the connection.
    pub(crate) fn get(&self) -> Option<i32> {
        match self.0.load(Ordering::Acquire) {
            NONE => None,
            pid => Some(pid),
        }
    }

    fn note(&self, pid: i32) {
        let _ = self
            .0
            .compare_exchange(NONE, pid, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// A Workload API connection that reads with `recvmsg` and remembers a writer other than
/// `connected`, the pid `SO_PEERCRED` reported. Writes go straight through.
pub(crate) struct WatchedStream {
    inner: UnixStream,
    connected: i32,
    other: OtherWriter,
}

impl WatchedStream {
    /// Watches `inner`, opened by `connected`. Without a pid (the peer is in a pid
    /// namespace the agent cannot see) there is nothing to compare with, and nothing is
    /// noted.
    pub(crate) fn new(inner: UnixStream, connected: Option<i32>) -> (Self, OtherWriter) {
        // Set on the listener already; set again in case this socket came another way.
        if let Err(e) = crate::sys::pass_credentials(inner.as_raw_fd()) {
            tracing::warn!(error = %e, "cannot ask for writers' credentials on a Workload API connection");
        }
        let other = OtherWriter(Arc::new(AtomicI32::new(NONE)));
        let stream = WatchedStream {
            inner,
            connected: connected.unwrap_or(NONE),
            other: other.clone(),
        };
        (stream, other)
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            match this.inner.try_io(Interest::READABLE, || {
                crate::sys::receive_with_writer(fd, unfilled)
            }) {
                Ok((n, writer)) => {
                    if n > 0
                        && this.connected != NONE
                        && let Some(pid) = writer
                        && pid != this.connected
                    {
                        this.other.note(pid);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use tokio::io::AsyncReadExt as _;

    use super::*;

    fn me() -> i32 {
        i32::try_from(std::process::id()).unwrap()
    }

    #[tokio::test]
    async fn bytes_written_by_the_connecting_process_note_no_one() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (mut watched, other) =
            WatchedStream::new(UnixStream::from_std(ours).unwrap(), Some(me()));
        theirs.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        watched.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(other.get(), None);
    }

    #[tokio::test]
    async fn bytes_written_by_another_process_name_it() {
        // Told that this process connected, while another one writes: what a forked child
        // or a process handed the descriptor would do.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = crate::workload_api::bind(&path).unwrap();
        let writer = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'borrowed'); s.close()",
            ])
            .arg(&path)
            .spawn()
            .unwrap();
        let writer_pid = i32::try_from(writer.id()).unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (mut watched, other) = WatchedStream::new(stream, Some(me()));
        let mut got = Vec::new();
        watched.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"borrowed");
        assert_eq!(other.get(), Some(writer_pid));
        let mut writer = writer;
        assert!(writer.wait().unwrap().success());
    }
}
