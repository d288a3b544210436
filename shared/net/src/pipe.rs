//! Byte copying for proxied raw TCP: both ways, with an idle timeout.
//!
//! What it is: [`pipe`], which copies between two byte streams until both
//! have closed (an end of stream is passed on as a shutdown of the other's
//! write half), one fails, or nothing moved either way for the idle timeout
//! ([`TCP_IDLE_TIMEOUT`] unless configured), and reports the bytes each way.
//! Who drives it: the spoke's raw TCP data plane (both ends) and the hub
//! gateway's raw TCP streams. What it must not do: keep a connection past
//! its idle timeout, or read a clock other than `tokio::time` (paused
//! clocks in tests).

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// The idle timeout of a proxied raw TCP connection, spoke and gateway
/// alike: closed when no byte moved either way for this long.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How a proxied connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their half.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle(Duration),
    /// A side failed (reset, refused, I/O error).
    Failed(String),
}

/// The outcome of [`pipe`].
#[derive(Debug)]
pub struct Piped {
    /// Bytes from the first side to the second (caller to workload).
    pub up: u64,
    /// Bytes from the second side to the first.
    pub down: u64,
    /// How it ended.
    pub end: End,
}

/// When bytes last moved, and how many each way.
struct Meter {
    start: Instant,
    /// Milliseconds from `start` to the last read that returned bytes.
    last_ms: AtomicU64,
    bytes: [AtomicU64; 2],
}

impl Meter {
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// One side of a [`pipe`]: counts what is read from it.
struct Metered<'a, T> {
    io: &'a mut T,
    meter: &'a Meter,
    side: usize,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if n > 0 {
            this.meter.bytes[this.side].fetch_add(n, Ordering::Relaxed);
            let ms = this.meter.start.elapsed().as_millis();
            this.meter
                .last_ms
                .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// Copies bytes both ways between `a` (the caller's side) and `b` until
/// both have closed (a side's end of stream is passed on as a shutdown of
/// the other's write half), one fails, or nothing moved for `idle`.
pub async fn pipe<A, B>(a: &mut A, b: &mut B, idle: Duration) -> Piped
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let meter = Meter {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        bytes: [AtomicU64::new(0), AtomicU64::new(0)],
    };
    let end = {
        let mut ma = Metered {
            io: a,
            meter: &meter,
            side: 0,
        };
        let mut mb = Metered {
            io: b,
            meter: &meter,
            side: 1,
        };
        let copy = tokio::io::copy_bidirectional(&mut ma, &mut mb);
        tokio::pin!(copy);
        loop {
            let deadline = meter.last() + idle;
            tokio::select! {
                r = &mut copy => break match r {
                    Ok(_) => End::Closed,
                    Err(e) => End::Failed(e.to_string()),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if meter.last() + idle <= Instant::now() {
                        break End::Idle(idle);
                    }
                }
            }
        }
    };
    Piped {
        up: meter.bytes[0].load(Ordering::Relaxed),
        down: meter.bytes[1].load(Ordering::Relaxed),
        end,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// An echo "workload" on one end of an in-memory pipe.
    fn echo(mut io: tokio::io::DuplexStream) {
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = io.shutdown().await;
        });
    }

    #[tokio::test(start_paused = true)]
    async fn copies_both_ways_counts_bytes_and_passes_on_the_close() {
        let (mut app, mut proxy_app) = duplex(64);
        let (mut proxy_up, workload) = duplex(64);
        echo(workload);
        let proxy = tokio::spawn(async move {
            pipe(&mut proxy_app, &mut proxy_up, Duration::from_secs(300)).await
        });
        // more than the in-memory buffers hold, so both directions stream
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (mut rd, mut wr) = tokio::io::split(&mut app);
        let sent = data.clone();
        let (_, got) = tokio::join!(
            async move {
                wr.write_all(&sent).await.unwrap();
                wr.shutdown().await.unwrap();
            },
            async move {
                let mut got = Vec::new();
                rd.read_to_end(&mut got).await.unwrap();
                got
            }
        );
        assert_eq!(got, data);
        let p = proxy.await.unwrap();
        assert_eq!(p.end, End::Closed);
        assert_eq!((p.up, p.down), (10_000, 10_000));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_a_slow_one_is_not() {
        let idle = Duration::from_secs(300);
        let (mut app, mut proxy_app) = duplex(64);
        let (mut proxy_up, workload) = duplex(64);
        echo(workload);
        let started = Instant::now();
        let proxy = tokio::spawn(async move { pipe(&mut proxy_app, &mut proxy_up, idle).await });
        // a byte every 200 s keeps it open past the timeout
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(200)).await;
            app.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            app.read_exact(&mut b).await.unwrap();
        }
        assert!(!proxy.is_finished());
        // then silence: closed one idle timeout after the last byte
        let p = proxy.await.unwrap();
        assert_eq!(p.end, End::Idle(idle));
        assert_eq!((p.up, p.down), (3, 3));
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_secs(900) && lived < Duration::from_secs(901),
            "{lived:?}"
        );
        // the app sees its connection end
        let mut rest = Vec::new();
        assert_eq!(app.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_side_ends_the_pipe_as_failed() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let (_app, mut proxy_app) = duplex(64);
        let p = pipe(&mut proxy_app, &mut Broken, Duration::from_secs(300)).await;
        assert!(matches!(p.end, End::Failed(_)), "{p:?}");
    }
}
