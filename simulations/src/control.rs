//! The control socket: a Unix socket (mode 0600) speaking JSON lines, through which a
//! running relay is changed and read.
//!
//! One JSON object per line each way; a connection may carry many requests.
//!
//! ```text
//! → {"cmd":"set","direction":"up","impairment":"delay 50ms loss 1%"}
//! ← {"ok":true,"impairments":{"up":"delay 50ms loss 1%","down":"none"}}
//! → {"cmd":"blackout","direction":"down"}        (direction defaults to "both")
//! → {"cmd":"heal"}
//! → {"cmd":"stats"}
//! ← {"ok":true,"stats":{"seed":42,"up":{"impairment":"…","received":10,…},…}}
//! ← {"ok":false,"error":"invalid request: …"}
//! ```
//!
//! Impairments travel as netem text and are parsed by the one parser in
//! [`crate::impairment`]. The server only translates requests into
//! [`crate::relay`] commands; the client is a blocking helper for the `ctl`
//! subcommand and scripts. Requests are bounded to 64 KiB, connections to 32 at a time.

use std::io::{BufRead, BufReader as StdBufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use crate::action::Action;
use crate::impairment::{Direction, Impairment};
use crate::relay::{Command, Impairments, RelayError, Stats};

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;
const MAX_CONNECTIONS: usize = 32;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Replace the impairment of `direction`.
    Set {
        /// Which direction(s); `both` if absent.
        #[serde(default)]
        direction: Direction,
        /// The new impairment, as netem text.
        impairment: Impairment,
    },
    /// Drop everything in `direction`, keeping its other settings.
    Blackout {
        /// Which direction(s); `both` if absent.
        #[serde(default)]
        direction: Direction,
    },
    /// Clear every impairment of `direction`.
    Heal {
        /// Which direction(s); `both` if absent.
        #[serde(default)]
        direction: Direction,
    },
    /// Read the counters, the seed and the current impairments.
    Stats,
}

impl Request {
    /// The change this request makes, `None` for `stats`.
    pub fn action(&self) -> Option<Action> {
        match self {
            Request::Set {
                direction,
                impairment,
            } => Some(Action::Set {
                direction: *direction,
                impairment: impairment.clone(),
            }),
            Request::Blackout { direction } => Some(Action::Blackout {
                direction: *direction,
            }),
            Request::Heal { direction } => Some(Action::Heal {
                direction: *direction,
            }),
            Request::Stats => None,
        }
    }
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// True if the request was carried out.
    pub ok: bool,
    /// Why not, if not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The impairments after a set, blackout or heal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impairments: Option<Impairments>,
    /// The answer to `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

impl Response {
    fn error(message: String) -> Self {
        Self {
            ok: false,
            error: Some(message),
            impairments: None,
            stats: None,
        }
    }
}

/// Why a control request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing is listening at the path.
    #[error("cannot connect to control socket {path}: {reason} (is the relay running with --control {path}?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// Reading or writing failed mid-request.
    #[error("control socket {path}: {reason}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: std::io::Error,
    },
    /// The relay's answer was not a response.
    #[error("invalid response from the relay: {0}")]
    Protocol(String),
    /// The relay answered with an error.
    #[error("the relay refused the request: {0}")]
    Refused(String),
}

/// Sends one request to the relay at `path` and waits (blocking, 10 s at most) for the
/// response. A response with `ok: false` becomes [`ControlError::Refused`].
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let io = |reason| ControlError::Io {
        path: path.to_owned(),
        reason,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|reason| ControlError::Connect {
            path: path.to_owned(),
            reason,
        })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    StdBufReader::new(stream.take(MAX_RESPONSE))
        .read_line(&mut answer)
        .map_err(io)?;
    let response: Response =
        serde_json::from_str(answer.trim()).map_err(|e| ControlError::Protocol(e.to_string()))?;
    if !response.ok {
        return Err(ControlError::Refused(
            response
                .error
                .unwrap_or_else(|| "no reason given".to_owned()),
        ));
    }
    Ok(response)
}

/// Binds the control socket at `path` with mode 0600. A stale socket left by a dead
/// relay is replaced; a live one, or a file that is not a socket, is an error.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, RelayError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(RelayError::ControlNotSocket {
                path: path.to_owned(),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(RelayError::ControlInUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(|reason| RelayError::Control {
            path: path.to_owned(),
            reason,
        })?;
    }
    let control_error = |reason| RelayError::Control {
        path: path.to_owned(),
        reason,
    };
    let listener = UnixListener::bind(path).map_err(control_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(control_error)?;
    Ok(listener)
}

/// Accepts control connections until the task is aborted.
pub(crate) async fn serve(listener: UnixListener, commands: mpsc::Sender<Command>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "control accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            debug!("control connection refused: too many open");
            continue;
        };
        let commands = commands.clone();
        tokio::spawn(async move {
            connection(stream, commands).await;
            drop(permit);
        });
    }
}

async fn connection(stream: UnixStream, commands: mpsc::Sender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
        let read = tokio::time::timeout(IDLE_TIMEOUT, read_line(limited, &mut line)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        let too_long = line.len() > MAX_REQUEST;
        let text = line.trim_ascii();
        if text.is_empty() && !too_long {
            continue;
        }
        let response = if too_long {
            Response::error(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match serde_json::from_slice::<Request>(text) {
                Ok(request) => execute(request, &commands).await,
                Err(e) => Response::error(format!("invalid request: {e}")),
            }
        };
        let Ok(mut out) = serde_json::to_vec(&response) else {
            return;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    mut reader: R,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    reader.read_until(b'\n', line).await
}

async fn execute(request: Request, commands: &mpsc::Sender<Command>) -> Response {
    let stopped = || Response::error("the relay is shutting down".to_owned());
    match request.action() {
        Some(action) => {
            let (reply, answer) = oneshot::channel();
            if commands.send(Command::Apply(action, reply)).await.is_err() {
                return stopped();
            }
            match answer.await {
                Ok(impairments) => Response {
                    ok: true,
                    error: None,
                    impairments: Some(impairments),
                    stats: None,
                },
                Err(_) => stopped(),
            }
        }
        None => {
            let (reply, answer) = oneshot::channel();
            if commands.send(Command::Stats(reply)).await.is_err() {
                return stopped();
            }
            match answer.await {
                Ok(stats) => Response {
                    ok: true,
                    error: None,
                    impairments: None,
                    stats: Some(stats),
                },
                Err(_) => stopped(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_json_lines() {
        let set: Request = serde_json::from_str(
            r#"{"cmd":"set","direction":"down","impairment":"delay 5ms loss 1%"}"#,
        )
        .expect("valid");
        assert_eq!(
            set.action(),
            Some(Action::Set {
                direction: Direction::Down,
                impairment: "delay 5ms loss 1%".parse().expect("valid")
            })
        );
        let stats: Request = serde_json::from_str(r#"{"cmd":"stats"}"#).expect("valid");
        assert_eq!(stats, Request::Stats);
        assert_eq!(stats.action(), None);
        for bad in [
            r#"{"cmd":"set","impairment":"loss 200%"}"#,
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"blackout","direction":"sideways"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_responses_omit_empty_fields() {
        let json = serde_json::to_string(&Response::error("nope".into())).expect("serializes");
        assert_eq!(json, r#"{"ok":false,"error":"nope"}"#);
    }
}
