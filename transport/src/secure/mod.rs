//! Authenticated, encrypted connections.
//!
//! Every connection starts with a mutually authenticated handshake on its control channel,
//! before anything else crosses: each side proves that it holds the pre-shared key (32
//! random bytes that `godwit key new` writes), without sending it, over fresh nonces from
//! both sides. Both then derive a session secret from the key and the nonces, and from it
//! one AES-256-GCM key per channel and direction ([`seal`]). The control channel is always
//! sealed; the data channels are sealed too unless the source asked for plaintext data
//! (`--no-encrypt`, for a trusted network), and then each still opens with a tag that only
//! a holder of the session secret can compute, so a stranger cannot attach a stream.
//!
//! ```text
//!  client (source)                                   server (destination)
//!    | -- GDWS v1 flags key-fingerprint nonce_c ----> |  same key? (else: status "wrong key")
//!    | <- GDWS v1 status nonce_s mac_s -------------- |  mac_s = HMAC(key, "server", transcript)
//!    | -- GDWS v1 mac_c -----------------------------> |  mac_c = HMAC(key, "client", transcript, mac_s)
//!    | <- GDWS v1 status ---------------------------- |  0: accepted, from here on sealed
//! ```
//!
//! A fingerprint (8 bytes of the key's SHA-256) travels in the clear so that two hosts with
//! different keys are told so plainly; it reveals nothing usable about a 256-bit random key.
//! RDMA data is authenticated at set-up (queue pairs and keys cross only on the sealed
//! control channel) but not encrypted: the NIC writes it straight into guest memory.

mod seal;
mod tls;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hkdf, hmac};

pub use seal::{SealedSink, SealedSource, SEAL_OVERHEAD};
pub use tls::{issue, new_ca, TlsIdentity};

use crate::{Channel, Connection, FrameSink, FrameSource, TransportError};

/// Version of the handshake.
const VERSION: u16 = 2;
const MAGIC: &[u8; 4] = b"GDWS";
/// Bytes of a pre-shared key.
pub const KEY_LEN: usize = 32;
/// How long each handshake message may take to arrive.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a handshake failed: each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file could not be used.
    #[error("cannot use the key file {path}: {why}; create one with `godwit key new FILE` and copy it to both hosts")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The two hosts hold different keys.
    #[error("the peer holds a different key (fingerprint {theirs}, ours {ours}); give both hosts the same --key file")]
    WrongKey {
        /// The peer's key fingerprint.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The peer's proof of the key did not verify.
    #[error("the peer's proof of the key did not verify: it does not hold our key, or someone on the path altered the handshake")]
    BadProof,
    /// The peer speaks another handshake version.
    #[error("the peer speaks handshake version {theirs}, this host speaks {ours}; run the same Godwit release on both hosts")]
    Version {
        /// The peer's version.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The two sides disagree on encrypting data.
    #[error("the source sends data {} but this receiver {}; use --no-encrypt on both hosts or on neither",
        if *source_plain { "in plaintext (--no-encrypt)" } else { "encrypted" },
        if *source_plain { "requires encryption" } else { "was started with --no-encrypt" })]
    EncryptionMismatch {
        /// Whether the source asked for plaintext data.
        source_plain: bool,
    },
    /// One host uses a key, the other a certificate.
    #[error("the source authenticates with {} but this receiver with {}; give both hosts --key, or both --cert, --cert-key and --ca",
        if *source_certificate { "a certificate" } else { "a key" },
        if *source_certificate { "a key" } else { "a certificate" })]
    ModeMismatch {
        /// Whether the source used a certificate.
        source_certificate: bool,
    },
    /// TLS failed: a certificate refused, or a file unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A handshake message was malformed.
    #[error("malformed handshake from the peer ({0}); is it a Godwit of the same release?")]
    Malformed(String),
    /// The transport failed during the handshake.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// A pre-shared key.
#[derive(Clone)]
pub struct Psk([u8; KEY_LEN]);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Psk({})", self.fingerprint())
    }
}

impl Psk {
    /// A fresh random key.
    pub fn generate() -> Result<Psk, AuthError> {
        let mut k = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| AuthError::KeyFile {
                path: "(new key)".into(),
                why: "the system's random source failed".into(),
            })?;
        Ok(Psk(k))
    }

    /// The key as the file holds it: 64 hex digits and a newline.
    pub fn to_file_text(&self) -> String {
        let mut s: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        s
    }

    /// Reads a key file written by [`Psk::to_file_text`]. Refuses a file that others can
    /// read: the key is the only thing between a stranger and the guest's memory.
    pub fn from_file(path: &Path) -> Result<Psk, AuthError> {
        let bad = |why: String| AuthError::KeyFile {
            path: path.display().to_string(),
            why,
        };
        check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Psk::from_hex(text.trim()).map_err(bad)
    }

    fn from_hex(hex: &str) -> Result<Psk, String> {
        if hex.len() != 2 * KEY_LEN || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "a key is {} hex digits, this is not one",
                2 * KEY_LEN
            ));
        }
        let mut k = [0u8; KEY_LEN];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Psk(k))
    }

    fn fingerprint_bytes(&self) -> [u8; 8] {
        let d = digest::digest(&digest::SHA256, &self.0);
        let mut f = [0u8; 8];
        f.copy_from_slice(&d.as_ref()[..8]);
        f
    }

    /// A short name for the key, safe to show: 8 bytes of its SHA-256, in hex.
    pub fn fingerprint(&self) -> String {
        hex(&self.fingerprint_bytes())
    }
}

/// Refuses a secret file (a key, a certificate's private key) that others can read: it is
/// all that stands between a stranger and the guest's memory.
pub fn check_private(path: &Path) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |why: String| AuthError::KeyFile {
        path: path.display().to_string(),
        why,
    };
    let mode = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "it is readable by others (mode {:o}); chmod 600 it",
            mode & 0o777
        )));
    }
    Ok(())
}

/// A random migration id: 16 hex digits.
pub fn random_id() -> Result<String, AuthError> {
    Ok(hex(&nonce()?[..8]))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a host proves itself with.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A pre-shared key, the same on both hosts.
    Key(Psk),
    /// A certificate from the operator's CA, and that CA.
    Certificate(TlsIdentity),
}

impl Credentials {
    /// A short description for logs: the key's fingerprint, or "certificate".
    pub fn describe(&self) -> String {
        match self {
            Credentials::Key(k) => format!("key {}", k.fingerprint()),
            Credentials::Certificate(_) => "certificate".into(),
        }
    }
}

/// How a side authenticates.
#[derive(Debug, Clone)]
pub struct AuthOptions {
    /// What this host proves itself with.
    pub credentials: Credentials,
    /// Whether data channels are sealed (the control channel always is).
    pub encrypt_data: bool,
}

/// Handshake status codes (server to client).
const OK: u8 = 0;
const WRONG_KEY: u8 = 1;
const ENCRYPTION_MISMATCH: u8 = 2;
const BAD_PROOF: u8 = 3;
const MODE_MISMATCH: u8 = 4;
const VERSION_MISMATCH: u8 = 5;

const FLAG_PLAIN_DATA: u8 = 1;

/// The session secret both sides derived, from which every channel key comes.
struct Session {
    prk: hkdf::Prk,
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// Which way a key protects.
#[derive(Clone, Copy)]
enum Dir {
    ToServer = 0,
    ToClient = 1,
}

impl Session {
    /// From a key proof: the key, both nonces and the transcript.
    fn from_key(key: &Psk, nonce_c: &[u8], nonce_s: &[u8], transcript: &[u8]) -> Session {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &[nonce_c, nonce_s].concat());
        let first = salt.extract(&key.0);
        let th = digest::digest(&digest::SHA256, transcript);
        let mut secret = [0u8; 32];
        first
            .expand(&[b"godwit psk v1 session", th.as_ref()], Len32)
            .and_then(|okm| okm.fill(&mut secret))
            .expect("HKDF output of 32 bytes");
        Session::from_secret(&secret)
    }

    /// From a secret both sides already share (TLS's exporter).
    fn from_secret(secret: &[u8; 32]) -> Session {
        Session {
            prk: hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, secret),
        }
    }

    /// The key of channel `index` (0 control, 1.. data streams) in direction `dir`.
    fn key(&self, index: usize, dir: Dir) -> [u8; 32] {
        let mut k = [0u8; 32];
        let idx = (index as u32).to_le_bytes();
        self.prk
            .expand(&[b"godwit channel", &idx, &[dir as u8]], Len32)
            .and_then(|okm| okm.fill(&mut k))
            .expect("HKDF output of 32 bytes");
        k
    }
}

fn mac(key: &Psk, label: &[u8], parts: &[&[u8]]) -> hmac::Tag {
    let k = hmac::Key::new(hmac::HMAC_SHA256, &key.0);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(label);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign()
}

fn verify(key: &Psk, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let k = hmac::Key::new(hmac::HMAC_SHA256, &key.0);
    hmac::verify(&k, &[label, &parts.concat()].concat(), tag).is_ok()
}

fn header() -> Vec<u8> {
    let mut m = Vec::with_capacity(80);
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(&VERSION.to_le_bytes());
    m
}

/// Checks a handshake message's magic and version.
fn check_header(buf: &[u8]) -> Result<(), AuthError> {
    if buf.len() < 6 || &buf[..4] != MAGIC {
        return Err(AuthError::Malformed("not a Godwit handshake".into()));
    }
    let theirs = u16::from_le_bytes([buf[4], buf[5]]);
    if theirs != VERSION {
        return Err(AuthError::Version {
            theirs,
            ours: VERSION,
        });
    }
    Ok(())
}

/// Receives one handshake message of exactly `len` bytes (header included).
fn recv_msg(source: &mut dyn FrameSource, len: usize) -> Result<Vec<u8>, AuthError> {
    let mut buf = Vec::new();
    if !source.recv(&mut buf)? {
        return Err(AuthError::Malformed(
            "the peer closed the connection in the handshake".into(),
        ));
    }
    check_header(&buf)?;
    if buf.len() != len {
        return Err(AuthError::Malformed(format!(
            "a message of {} bytes where {len} were due",
            buf.len()
        )));
    }
    Ok(buf)
}

fn send_msg(sink: &mut dyn FrameSink, msg: &[u8]) -> Result<(), AuthError> {
    sink.send(&[msg])?;
    sink.flush()?;
    Ok(())
}

fn nonce() -> Result<[u8; 32], AuthError> {
    let mut n = [0u8; 32];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| AuthError::Malformed("the system's random source failed".into()))?;
    Ok(n)
}

/// The first message: header, mode, flags, then for a key its fingerprint and a nonce.
const MSG1_KEY_LEN: usize = 6 + 2 + 8 + 32;
const MSG1_TLS_LEN: usize = 6 + 2;
const MSG2_LEN: usize = 6 + 1 + 32 + 32;
const MSG3_LEN: usize = 6 + 32;
/// A bare status: the key proof's verdict, or the answer to a certificate source's hello.
const STATUS_LEN: usize = 6 + 1;

const MODE_KEY: u8 = 1;
const MODE_TLS: u8 = 2;

fn mode_of(c: &Credentials) -> u8 {
    match c {
        Credentials::Key(_) => MODE_KEY,
        Credentials::Certificate(_) => MODE_TLS,
    }
}

fn flags_of(encrypt_data: bool) -> u8 {
    if encrypt_data {
        0
    } else {
        FLAG_PLAIN_DATA
    }
}

/// The source's side of the handshake on `conn`'s control channel; returns the connection
/// with every channel sealed (or, with plaintext data, tagged).
pub fn client(mut conn: Connection, opts: &AuthOptions) -> Result<Connection, AuthError> {
    conn.control.set_read_timeout(Some(STEP_TIMEOUT))?;
    let flags = flags_of(opts.encrypt_data);
    let mut m1 = header();
    m1.extend_from_slice(&[mode_of(&opts.credentials), flags]);
    let session = match &opts.credentials {
        Credentials::Key(key) => {
            let nonce_c = nonce()?;
            m1.extend_from_slice(&key.fingerprint_bytes());
            m1.extend_from_slice(&nonce_c);
            send_msg(&mut *conn.control.sink, &m1)?;
            let m2 = recv_msg(&mut *conn.control.source, MSG2_LEN)?;
            refused(m2[6], &m2[7..15], opts)?;
            let (nonce_s, mac_s) = (&m2[7..39], &m2[39..71]);
            let transcript = [&m1[..], &m2[..39]].concat();
            if !verify(key, b"godwit psk v1 server", &[&transcript], mac_s) {
                return Err(AuthError::BadProof);
            }
            let mac_c = mac(key, b"godwit psk v1 client", &[&transcript, mac_s]);
            let mut m3 = header();
            m3.extend_from_slice(mac_c.as_ref());
            send_msg(&mut *conn.control.sink, &m3)?;
            let m4 = recv_msg(&mut *conn.control.source, STATUS_LEN)?;
            match m4[6] {
                OK => {}
                BAD_PROOF => return Err(AuthError::BadProof),
                s => return Err(AuthError::Malformed(format!("status {s}"))),
            }
            Session::from_key(key, &nonce_c, nonce_s, &transcript)
        }
        Credentials::Certificate(id) => {
            send_msg(&mut *conn.control.sink, &m1)?;
            let m2 = recv_msg(&mut *conn.control.source, STATUS_LEN)?;
            refused(m2[6], &[], opts)?;
            Session::from_secret(&tls::client(id, &mut conn.control, flags)?)
        }
    };
    conn.control.set_read_timeout(None)?;
    Ok(protect(conn, &session, Dir::ToServer, opts.encrypt_data))
}

/// What a refusal status from the server means, as the client's error (`theirs`: the
/// server's key fingerprint, for a wrong key).
fn refused(status: u8, theirs: &[u8], opts: &AuthOptions) -> Result<(), AuthError> {
    match status {
        OK => Ok(()),
        WRONG_KEY => Err(AuthError::WrongKey {
            theirs: hex(theirs),
            ours: match &opts.credentials {
                Credentials::Key(k) => k.fingerprint(),
                other => other.describe(),
            },
        }),
        ENCRYPTION_MISMATCH => Err(AuthError::EncryptionMismatch {
            source_plain: !opts.encrypt_data,
        }),
        MODE_MISMATCH => Err(AuthError::ModeMismatch {
            source_certificate: matches!(opts.credentials, Credentials::Certificate(_)),
        }),
        s => Err(AuthError::Malformed(format!("status {s}"))),
    }
}

/// The destination's side of the handshake; returns the connection with every channel
/// sealed (or, with plaintext data, checked).
pub fn server(mut conn: Connection, opts: &AuthOptions) -> Result<Connection, AuthError> {
    conn.control.set_read_timeout(Some(STEP_TIMEOUT))?;
    let mut m1 = Vec::new();
    if !conn.control.source.recv(&mut m1)? {
        return Err(AuthError::Malformed(
            "the peer closed the connection in the handshake".into(),
        ));
    }
    if let Err(e) = check_header(&m1) {
        // A Godwit of another release: answer in this version, which it reports plainly.
        if matches!(e, AuthError::Version { .. }) {
            let mut m = header();
            m.push(VERSION_MISMATCH);
            let _ = send_msg(&mut *conn.control.sink, &m);
        }
        return Err(e);
    }
    let (mode, flags) = match m1.get(6..8) {
        Some(&[mode, flags]) => (mode, flags),
        _ => return Err(AuthError::Malformed("a hello without a mode".into())),
    };
    let want_len = match mode {
        MODE_KEY => MSG1_KEY_LEN,
        MODE_TLS => MSG1_TLS_LEN,
        m => return Err(AuthError::Malformed(format!("unknown mode {m}"))),
    };
    if m1.len() != want_len {
        return Err(AuthError::Malformed(format!(
            "a hello of {} bytes where {want_len} were due",
            m1.len()
        )));
    }
    // A refusal in the shape the client waits for: its key's answer, or a bare status.
    let ours_fingerprint = match &opts.credentials {
        Credentials::Key(k) => k.fingerprint_bytes().to_vec(),
        Credentials::Certificate(_) => Vec::new(),
    };
    let refuse = |control: &mut Channel, status: u8| {
        let mut m = header();
        m.push(status);
        if mode == MODE_KEY {
            m.extend_from_slice(&ours_fingerprint);
            m.resize(MSG2_LEN, 0);
        }
        let _ = send_msg(&mut *control.sink, &m);
    };
    let plain = flags & FLAG_PLAIN_DATA != 0;
    if mode != mode_of(&opts.credentials) {
        refuse(&mut conn.control, MODE_MISMATCH);
        return Err(AuthError::ModeMismatch {
            source_certificate: mode == MODE_TLS,
        });
    }
    if plain == opts.encrypt_data {
        refuse(&mut conn.control, ENCRYPTION_MISMATCH);
        return Err(AuthError::EncryptionMismatch {
            source_plain: plain,
        });
    }
    let session = match &opts.credentials {
        Credentials::Key(key) => {
            let (fingerprint, nonce_c) = (&m1[8..16], &m1[16..48]);
            if fingerprint != key.fingerprint_bytes() {
                refuse(&mut conn.control, WRONG_KEY);
                return Err(AuthError::WrongKey {
                    theirs: hex(fingerprint),
                    ours: key.fingerprint(),
                });
            }
            let nonce_s = nonce()?;
            let mut m2 = header();
            m2.push(OK);
            m2.extend_from_slice(&nonce_s);
            let transcript = [&m1[..], &m2[..]].concat();
            let mac_s = mac(key, b"godwit psk v1 server", &[&transcript]);
            m2.extend_from_slice(mac_s.as_ref());
            send_msg(&mut *conn.control.sink, &m2)?;
            let m3 = recv_msg(&mut *conn.control.source, MSG3_LEN)?;
            let proven = verify(
                key,
                b"godwit psk v1 client",
                &[&transcript, mac_s.as_ref()],
                &m3[6..],
            );
            let mut m4 = header();
            m4.push(if proven { OK } else { BAD_PROOF });
            send_msg(&mut *conn.control.sink, &m4)?;
            if !proven {
                return Err(AuthError::BadProof);
            }
            Session::from_key(key, nonce_c, &nonce_s, &transcript)
        }
        Credentials::Certificate(id) => {
            let mut m2 = header();
            m2.push(OK);
            send_msg(&mut *conn.control.sink, &m2)?;
            Session::from_secret(&tls::server(id, &mut conn.control, flags)?)
        }
    };
    conn.control.set_read_timeout(None)?;
    Ok(protect(conn, &session, Dir::ToClient, opts.encrypt_data))
}

/// Seals every channel of `conn` (`ours` is the direction this side sends in); with
/// plaintext data, the data channels instead open with a tag.
fn protect(conn: Connection, session: &Session, ours: Dir, encrypt_data: bool) -> Connection {
    let theirs = match ours {
        Dir::ToServer => Dir::ToClient,
        Dir::ToClient => Dir::ToServer,
    };
    let seal = |ch: Channel, index: usize| {
        ch.map(
            |sink| Box::new(SealedSink::new(sink, &session.key(index, ours))),
            |source| Box::new(SealedSource::new(source, &session.key(index, theirs))),
        )
    };
    let tag = |ch: Channel, index: usize| {
        ch.map(
            |sink| Box::new(TaggedSink::new(sink, session.key(index, ours))),
            |source| Box::new(TaggedSource::new(source, session.key(index, theirs))),
        )
    };
    Connection {
        control: seal(conn.control, 0),
        data: conn
            .data
            .into_iter()
            .enumerate()
            .map(|(i, ch)| {
                if encrypt_data {
                    seal(ch, i + 1)
                } else {
                    tag(ch, i + 1)
                }
            })
            .collect(),
    }
}

/// What a plaintext data channel's first frame authenticates.
const STREAM_TAG_LABEL: &[u8] = b"godwit plaintext stream";

/// A plaintext data channel's sending half: its first frame is a tag that proves the
/// session, then frames pass as they are.
struct TaggedSink {
    inner: Box<dyn FrameSink>,
    tag: Option<hmac::Tag>,
}

impl TaggedSink {
    fn new(inner: Box<dyn FrameSink>, key: [u8; 32]) -> Self {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), STREAM_TAG_LABEL);
        TaggedSink {
            inner,
            tag: Some(tag),
        }
    }
}

impl FrameSink for TaggedSink {
    fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        if let Some(t) = self.tag.take() {
            self.inner.send(&[t.as_ref()])?;
        }
        self.inner.send(parts)
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush()
    }

    #[cfg(feature = "rdma")]
    fn as_rdma(&mut self) -> Option<&mut crate::rdma::RdmaSink> {
        self.inner.as_rdma()
    }
}

/// A plaintext data channel's receiving half: checks the first frame's tag.
struct TaggedSource {
    inner: Box<dyn FrameSource>,
    /// The key of the first frame's tag, until it has been checked.
    key: Option<hmac::Key>,
}

impl TaggedSource {
    fn new(inner: Box<dyn FrameSource>, key: [u8; 32]) -> Self {
        TaggedSource {
            inner,
            key: Some(hmac::Key::new(hmac::HMAC_SHA256, &key)),
        }
    }
}

impl FrameSource for TaggedSource {
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError> {
        if let Some(key) = &self.key {
            if !self.inner.recv(buf)? {
                return Ok(false);
            }
            if hmac::verify(key, STREAM_TAG_LABEL, buf).is_err() {
                return Err(TransportError::Sealing(
                    "a data stream did not open with this session's tag: it does not belong \
                     to the authenticated migration"
                        .into(),
                ));
            }
            self.key = None;
        }
        self.inner.recv(buf)
    }
}

#[cfg(test)]
mod tests;
