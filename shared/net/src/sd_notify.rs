//! systemd's service notification protocol (`sd_notify(3)`), without
//! libsystemd and without unsafe code: newline-separated `KEY=VALUE`
//! assignments in one datagram to the Unix socket named by `NOTIFY_SOCKET`
//! (a path, or an abstract socket when it starts with `@`).
//!
//! Who drives it: the hub's `serve` and the spoke's `run` send `READY=1`
//! when they are ready, `STATUS=` lines while they are not, `STOPPING=1` on
//! shutdown, and run [`watchdog`] for `WatchdogSec=`. What it must not do:
//! fail a process that is not under systemd: with no `NOTIFY_SOCKET` every
//! call is a no-op, and a send that fails is logged, never fatal.

use std::{io, time::Duration};

use tracing::debug;

/// The environment variable systemd names its socket in.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to the socket in
/// `NOTIFY_SOCKET`. `Ok(false)` when the variable is unset or empty.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(path) if !path.is_empty() => {
            send_to(&path.to_string_lossy(), state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// [`notify`], logging a failure instead of returning it.
pub fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        debug!(error = %e, state, "sd_notify failed");
    }
}

fn send_to(socket: &str, state: &str) -> io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    if let Some(name) = socket.strip_prefix('@') {
        send_abstract(&sock, name, state)
    } else if socket.starts_with('/') {
        let n = sock.send_to(state.as_bytes(), socket)?;
        short_write(n, state)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET}={socket:?}: neither a path nor an abstract socket (@name)"),
        ))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(
    sock: &std::os::unix::net::UnixDatagram,
    name: &str,
    state: &str,
) -> io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let n = sock.send_to_addr(state.as_bytes(), &addr)?;
    short_write(n, state)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(
    _sock: &std::os::unix::net::UnixDatagram,
    name: &str,
    _state: &str,
) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("abstract socket @{name}: only on Linux"),
    ))
}

fn short_write(n: usize, state: &str) -> io::Result<()> {
    if n == state.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {n} of {} bytes", state.len()),
        ))
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, set with
/// `WatchdogSec=`), if it is meant for this process (`WATCHDOG_PID` unset
/// or this process's ID) and a notification socket is set.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty())?;
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for, for as long
/// as the task runs (on the async runtime: a wedged runtime stops the pings
/// and systemd restarts the process). Returns at once when no watchdog is
/// set.
pub async fn watchdog() {
    let Some(every) = watchdog_interval() else {
        return;
    };
    let half = (every / 2).max(Duration::from_millis(10));
    debug!(interval = ?every, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notify_logged("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_socket() {
        let dir = tempdir();
        let path = dir.join("notify.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        send_to(path.to_str().expect("utf8"), "READY=1\nSTATUS=up").expect("send");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("tidemesh-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .expect("abstract name");
            let rx = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind abstract");
            rx.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            send_to(&format!("@{name}"), "WATCHDOG=1").expect("send abstract");
            let n = rx.recv(&mut buf).expect("recv");
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }

        let e = send_to("relative/path", "READY=1").expect_err("not a socket address");
        assert!(e.to_string().contains("neither a path"), "{e}");
        // nobody listens there: an error, not a panic
        assert!(send_to(dir.join("gone.sock").to_str().expect("utf8"), "READY=1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tidemesh-sdnotify-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }
}
