//! The local admin API: JSON lines over a Unix socket (mode 0600) inside the
//! data directory, as SPIRE's agent and server do. One request per
//! connection: `{"cmd": "...", ...}` then `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "..."}`.

use std::{
    future::Future,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

/// Requests larger than this are refused.
pub const MAX_REQUEST: usize = 16 << 20;
/// The socket's file name inside a data directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// The admin socket of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Who is calling: the peer's uid from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The peer process's user id, if the OS told us.
    pub uid: Option<u32>,
}

/// Errors of an admin call.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No process listens on the socket.
    #[error("cannot reach {path}: {source} (is the process running with this --data-dir?)")]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server refused the command.
    #[error("{0}")]
    Refused(String),
    /// The answer was not understood.
    #[error("bad answer from the admin socket: {0}")]
    BadAnswer(String),
}

/// Binds the admin socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        // A live process still holding it would answer; a stale file would not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves admin requests until the listener fails or the task is dropped.
pub async fn serve<H, F>(listener: UnixListener, handler: H)
where
    H: Fn(Caller, Value) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Value, String>> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let caller = Caller {
                uid: stream.peer_cred().ok().map(|c| c.uid()),
            };
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(r).take_limit();
            let answer = match reader.read_line(&mut line).await {
                Ok(0) => return,
                Ok(_) if line.len() >= MAX_REQUEST => {
                    json!({"ok": false, "error": "request too large"})
                }
                Ok(_) => match serde_json::from_str::<Value>(&line) {
                    Ok(req) => match handler(caller, req).await {
                        Ok(result) => json!({"ok": true, "result": result}),
                        Err(error) => json!({"ok": false, "error": error}),
                    },
                    Err(e) => json!({"ok": false, "error": format!("malformed request: {e}")}),
                },
                Err(e) => json!({"ok": false, "error": format!("read failed: {e}")}),
            };
            let mut out = answer.to_string();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

trait TakeLimit: Sized {
    fn take_limit(self) -> tokio::io::Take<Self>;
}
impl<R: tokio::io::AsyncRead> TakeLimit for BufReader<R> {
    fn take_limit(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, MAX_REQUEST as u64)
    }
}

/// Sends one request and returns its `result`.
pub async fn call(path: &Path, req: Value) -> Result<Value, AdminError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Unreachable {
            path: path.to_owned(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut out = req.to_string();
    out.push('\n');
    w.write_all(out.as_bytes())
        .await
        .map_err(|e| AdminError::BadAnswer(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(r)
        .take_limit()
        .read_line(&mut line)
        .await
        .map_err(|e| AdminError::BadAnswer(e.to_string()))?;
    let v: Value = serde_json::from_str(&line).map_err(|e| AdminError::BadAnswer(e.to_string()))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    } else {
        Err(AdminError::Refused(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_owned(),
        ))
    }
}
