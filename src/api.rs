//! The control API of a VM process: newline-delimited JSON over a Unix socket.
//!
//! `godwit run` and `godwit receive` host one VM each and listen on an API socket; `godwit send`,
//! `status`, `cancel` and `stop` are clients. A request is one line; the answer is one or more
//! event lines, the last of which is `report`, `status`, `ok` or `error`. Unknown fields are
//! refused so a typo in a hand-written request is an error, not a silent default.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use godwit_transport::secure::{AuthError, Credentials, Psk, TlsIdentity};
use serde::{Deserialize, Serialize};

use crate::migration::dataplane::TransportMode;
use crate::migration::forecast::Forecast;
use crate::migration::policy::CompressMode;
use crate::migration::report::{Progress, Report};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 << 10;

/// What a client asks of a VM process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Where the VM is and what it does.
    Status,
    /// Move the VM to another host; answered with progress events and a report.
    Migrate(MigrateRequest),
    /// Predict what `Migrate` would take, moving nothing; answered with a forecast.
    Forecast {
        /// The migration it would be.
        migrate: MigrateRequest,
        /// How long to watch the guest's writes, in milliseconds.
        sample_ms: u64,
    },
    /// Stop a migration in progress (before its point of no return).
    Cancel,
    /// Stop the VM and its process.
    Stop,
    /// Run again a VM that a migration left paused in doubt (the operator checked that the
    /// destination does not run it).
    Resume,
}

/// The parameters of a migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `HOST:PORT` of a `godwit receive`.
    pub to: String,
    /// Data streams.
    pub streams: usize,
    /// Page worker threads.
    pub threads: usize,
    /// Compression.
    pub compress: CompressMode,
    /// Downtime budget in milliseconds.
    pub max_downtime_ms: u64,
    /// Most pre-copy rounds, if limited.
    pub max_rounds: Option<u32>,
    /// Deadline for the whole migration; `None` for the default of the guest's size.
    pub deadline_ms: Option<u64>,
    /// Whether the guest may be throttled.
    pub allow_throttle: bool,
    /// Whether the VM may be handed over before all of its memory (post-copy).
    pub allow_postcopy: bool,
    /// Cap on bytes per second, if any.
    pub max_bandwidth: Option<u64>,
    /// Which data plane.
    pub transport: TransportMode,
    /// The id the destination was started for.
    pub migration_id: String,
    /// What the VM's process authenticates with (absolute paths; it reads the files).
    pub auth: AuthFiles,
    /// Whether TCP data streams are encrypted.
    pub encrypt_data: bool,
    /// How long to wait for each answer of the destination, and for a stalled stream, in
    /// milliseconds.
    pub reply_timeout_ms: u64,
}

/// The files a host authenticates with.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AuthFiles {
    /// A pre-shared key file (`godwit key new`).
    Key(PathBuf),
    /// This host's certificate and private key, and the CA's certificate (`godwit ca`).
    Certificate {
        /// The host's certificate (PEM).
        cert: PathBuf,
        /// Its private key (PEM, mode 600).
        key: PathBuf,
        /// The CA's certificate (PEM).
        ca: PathBuf,
    },
}

impl AuthFiles {
    /// Reads the files.
    pub fn load(&self) -> Result<Credentials, AuthError> {
        Ok(match self {
            AuthFiles::Key(k) => Credentials::Key(Psk::from_file(k)?),
            AuthFiles::Certificate { cert, key, ca } => {
                Credentials::Certificate(TlsIdentity::load(cert, key, ca)?)
            }
        })
    }
}

/// The VM process's state, as `status` reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// `running`, `migrating`, or `paused` (after an in-doubt migration).
    pub state: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Process ID of the VM process.
    pub pid: u32,
}

/// What a VM process answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Live migration progress.
    Progress(Progress),
    /// The migration's final report.
    Report(Box<Report>),
    /// The answer to `Forecast`.
    Forecast(Box<Forecast>),
    /// The answer to `status`.
    Status(Status),
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

/// Why talking to a VM process failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No VM process listens there.
    #[error("cannot reach a VM at {path}: {source}; is `godwit run` or `godwit receive` running with --api {path}?")]
    Connect {
        /// The socket path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The connection failed midway.
    #[error("the VM process at {0} stopped answering: {1}")]
    Io(String, std::io::Error),
    /// A line did not parse.
    #[error("the VM process sent an unreadable answer: {0}")]
    Decode(serde_json::Error),
}

/// A client connection to a VM process.
#[derive(Debug)]
pub struct Client {
    path: String,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the VM process listening on `path`.
    pub fn connect(path: &Path) -> Result<Self, ApiError> {
        let p = path.display().to_string();
        let s = UnixStream::connect(path).map_err(|e| ApiError::Connect {
            path: p.clone(),
            source: e,
        })?;
        let reader = BufReader::new(s.try_clone().map_err(|e| ApiError::Io(p.clone(), e))?);
        Ok(Self {
            path: p,
            writer: s,
            reader,
        })
    }

    /// Sends a request.
    pub fn send(&mut self, req: &Request) -> Result<(), ApiError> {
        let mut line = serde_json::to_vec(req).map_err(ApiError::Decode)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| ApiError::Io(self.path.clone(), e))
    }

    /// Reads the next event; `None` when the process closed the connection.
    pub fn next_event(&mut self) -> Result<Option<Event>, ApiError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| ApiError::Io(self.path.clone(), e))?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(ApiError::Decode)
    }
}

/// One accepted API connection, on the server side.
#[derive(Debug)]
pub struct Connection {
    writer: UnixStream,
    reader: BufReader<std::io::Take<UnixStream>>,
}

impl Connection {
    /// Wraps an accepted stream.
    pub fn new(s: UnixStream) -> std::io::Result<Self> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = BufReader::new(s.try_clone()?.take(MAX_LINE));
        Ok(Self { writer: s, reader })
    }

    /// Reads the request line.
    pub fn request(&mut self) -> Result<Request, String> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the request: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))
    }

    /// Sends an event; errors mean the client went away, which does not stop the VM.
    pub fn send(&mut self, event: &Event) -> bool {
        let Ok(mut line) = serde_json::to_vec(event) else {
            return false;
        };
        line.push(b'\n');
        self.writer.write_all(&line).is_ok()
    }
}
