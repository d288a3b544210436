//! quinn over turmoil: an [`quinn::AsyncUdpSocket`] backed by
//! `turmoil::net::UdpSocket`, so the real hub and spoke run in turmoil's
//! simulated network and virtual time (quinn's tokio runtime reads tokio's
//! paused clock, which turmoil drives).
//!
//! turmoil's UDP has no vectored I/O, GSO, GRO or ECN: one datagram per call.

use std::{
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use quinn::udp::{RecvMeta, Transmit};

type ReadableFut = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// A turmoil UDP socket for quinn.
pub struct TurmoilUdp {
    sock: Arc<turmoil::net::UdpSocket>,
    readable: Mutex<Option<ReadableFut>>,
}

impl fmt::Debug for TurmoilUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurmoilUdp")
            .field("local", &self.sock.local_addr().ok())
            .finish()
    }
}

impl TurmoilUdp {
    /// Binds inside the current turmoil host.
    pub async fn bind(addr: SocketAddr) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let sock = turmoil::net::UdpSocket::bind(addr).await?;
        Ok(Arc::new(TurmoilUdp {
            sock: Arc::new(sock),
            readable: Mutex::new(None),
        }))
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        // turmoil's send is synchronous and never blocks.
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for TurmoilUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        match t.segment_size {
            Some(seg) if seg > 0 => {
                for chunk in t.contents.chunks(seg) {
                    self.sock.try_send_to(chunk, t.destination)?;
                }
            }
            _ => {
                self.sock.try_send_to(t.contents, t.destination)?;
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        loop {
            match self.sock.try_recv_from(buf) {
                Ok((len, addr)) => {
                    *m = RecvMeta {
                        addr,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: None,
                    };
                    return Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut slot = match self.readable.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            let fut = slot.get_or_insert_with(|| {
                let sock = self.sock.clone();
                Box::pin(async move { sock.readable().await })
            });
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    *slot = None;
                    r?;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}
