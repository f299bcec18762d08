//! The control channel: while the daemon holds the state file, the inspection and repair
//! commands are served by it over a Unix socket beside the state file (mode 0600: only the
//! daemon's OS user can use it; nothing to configure).
//!
//! A command sends its arguments as one JSON line; the daemon runs the same command on its
//! own state and answers with JSON lines: `{"out": text}` for what the command prints,
//! `{"err": text}` for its error, and last `{"exit": code}`. An answer that ends without
//! its exit code (the daemon stopped mid-way) is an error for the command, never a half
//! answer taken for a whole one.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;

/// Runs one command (its arguments, as typed, and who asked: see [`os_user`]) against the
/// daemon's pipeline, writing what it prints to the writer and its error (if any) to the
/// string; returns the exit code.
pub type Handler =
    Arc<dyn Fn(&[String], &str, &Arc<Pipeline>, &mut dyn Write, &mut String) -> u8 + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot serve the control channel at {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon's control channel at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon stopped while answering (nothing more was done than the audit trail shows; run the command again)")]
    Cut,
}

#[derive(Serialize, Deserialize)]
struct Request {
    argv: Vec<String>,
    /// The user who ran sudo to become the daemon's user, as sudo reported it.
    sudo_user: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Frame {
    Out(String),
    Err(String),
    Exit(u8),
}

/// How long the daemon waits for a client to send its request, or to take its output.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest request line (arguments are short; a key or a reason at most a few KiB).
const MAX_REQUEST: u64 = 64 << 10;

/// The socket of the daemon that holds `state_path`.
pub fn socket_path(state_path: &Path) -> PathBuf {
    let mut name = state_path.as_os_str().to_owned();
    name.push(".sock");
    PathBuf::from(name)
}

/// Serves commands until shutdown. The caller holds the state's lock, so a socket file
/// left by a daemon that died is stale and replaced.
pub async fn serve(
    state_path: &Path,
    pipeline: Arc<Pipeline>,
    handler: Handler,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    let path = socket_path(state_path);
    let bind = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind(e)),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(bind)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    tracing::info!(path = %path.display(), "control channel up");
    // Commands still running at shutdown finish (their requests settle) before the daemon
    // lets go of its state.
    let commands = tokio_util::task::TaskTracker::new();
    Ok(tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "control channel: cannot accept");
                        continue;
                    }
                },
                _ = shutdown.triggered() => break,
            };
            let (pipeline, handler) = (pipeline.clone(), handler.clone());
            commands.spawn_blocking(move || {
                if let Err(e) = answer(stream, &pipeline, &handler) {
                    tracing::warn!(error = %e, "control channel: a command was cut short");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
        commands.close();
        commands.wait().await;
    }))
}

/// Reads one request and runs it, streaming its output as frames.
fn answer(
    stream: tokio::net::UnixStream,
    pipeline: &Arc<Pipeline>,
    handler: &Handler,
) -> std::io::Result<()> {
    // Who asks is what the kernel says of the socket's peer, not what the request claims.
    let uid = stream.peer_cred()?.uid();
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    // A client that sends nothing, or stops reading, cannot hold the daemon's stop up.
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let request: Request = serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    // Lines gathered into frames of up to 8 KiB, not a frame per write.
    let mut out = std::io::BufWriter::with_capacity(8 << 10, Frames(&stream));
    let mut error = String::new();
    let by = operator_of(uid, request.sudo_user);
    let code = handler(&request.argv, &by, pipeline, &mut out, &mut error);
    out.flush()?;
    drop(out);
    if !error.is_empty() {
        send(&stream, &Frame::Err(error))?;
    }
    send(&stream, &Frame::Exit(code))
}

/// What a command prints, as `out` frames.
struct Frames<'a>(&'a std::os::unix::net::UnixStream);

impl Write for Frames<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        send(
            self.0,
            &Frame::Out(String::from_utf8_lossy(bytes).into_owned()),
        )?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn send(mut stream: &std::os::unix::net::UnixStream, frame: &Frame) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(frame).expect("a frame serializes");
    line.push(b'\n');
    stream.write_all(&line)
}

/// Who runs a command from the command line, as the audit trail names them: `cli:` and
/// the OS user the kernel says runs it, and the user who became it through sudo, if one did
/// (as sudo reports it).
pub fn os_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    operator_of(uid, std::env::var("SUDO_USER").ok())
}

fn operator_of(uid: u32, sudo_user: Option<String>) -> String {
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.get(2).and_then(|f| f.parse().ok()) == Some(uid))
                    .then(|| fields[0].to_owned())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"));
    // A user name as sudo sets it; anything else (it comes from the client) is left out.
    let plausible = |user: &String| {
        !user.is_empty()
            && user.len() <= 64
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    match sudo_user.filter(|user| plausible(user) && *user != name) {
        Some(user) => format!("cli:{name} (sudo by {user})"),
        None => format!("cli:{name}"),
    }
}

/// The daemon's answer to a command sent over its channel, or `None` when no daemon
/// listens there (the command then runs on the file itself).
pub fn connect(state_path: &Path) -> Option<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(socket_path(state_path)).ok()
}

/// Sends a command to the daemon and relays its answer: what it prints to `out`, its error
/// to stderr. Returns its exit code.
pub fn run_remote(
    stream: std::os::unix::net::UnixStream,
    state_path: &Path,
    argv: Vec<String>,
    out: &mut dyn Write,
) -> Result<u8, RemoteError> {
    let io = |source| {
        RemoteError::Control(ControlError::Io {
            path: socket_path(state_path),
            source,
        })
    };
    let request = Request {
        argv,
        sudo_user: std::env::var("SUDO_USER").ok(),
    };
    let mut request = serde_json::to_vec(&request).expect("a request serializes");
    request.push(b'\n');
    (&stream).write_all(&request).map_err(io)?;
    for line in BufReader::new(&stream).lines() {
        let line = line.map_err(io)?;
        let frame: Frame = serde_json::from_str(&line)
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        match frame {
            Frame::Out(text) => out
                .write_all(text.as_bytes())
                .map_err(RemoteError::Output)?,
            Frame::Err(text) => eprintln!("{text}"),
            Frame::Exit(code) => return Ok(code),
        }
    }
    Err(RemoteError::Control(ControlError::Cut))
}

/// Why a command sent to the daemon failed: the channel, or this side's output.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Control(ControlError),
    #[error("cannot write to stdout")]
    Output(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_is_named_by_the_os_user_and_who_ran_sudo() {
        assert_eq!(operator_of(0, None), "cli:root");
        assert_eq!(
            operator_of(0, Some("alice".into())),
            "cli:root (sudo by alice)"
        );
        assert_eq!(operator_of(0, Some("root".into())), "cli:root");
        assert_eq!(operator_of(0, Some("x) (by console".into())), "cli:root");
        assert_eq!(operator_of(4_000_000_000, None), "cli:uid 4000000000");
    }
}
