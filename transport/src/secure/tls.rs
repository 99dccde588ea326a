//! Certificates instead of a shared key: the operator makes a CA once (`godwit ca new`) and a
//! certificate for each host (`godwit ca issue`); the control channel then runs a TLS 1.3
//! handshake (rustls) over its frames in which each side checks the other's certificate
//! against that CA, the source also checking that the destination's names the address it
//! dialled. Every channel's keys then come from the TLS exporter, and the same sealing as with
//! a pre-shared key follows ([`super::seal`]): TLS authenticates, the sealed frames carry.
//! The TLS session itself ends with the handshake (no tickets, no resumption).

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use super::AuthError;
use crate::Channel;

/// The CA's name: fixed, so `issue` can rebuild the issuer from the CA's key alone.
const CA_NAME: &str = "Godwit migration CA";
/// What the exporter derives the session secret under.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-godwit-session-v1";

/// A host's certificate, its key, and the CA it trusts.
#[derive(Clone)]
pub struct TlsIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> AuthError {
    AuthError::KeyFile {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

impl TlsIdentity {
    /// Loads PEM files: this host's certificate, its private key (mode 600) and the CA.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<TlsIdentity, AuthError> {
        super::check_private(key)?;
        let certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, AuthError> {
            let v = CertificateDer::pem_file_iter(p)
                .map_err(|e| file_err(p, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(p, e))?;
            if v.is_empty() {
                return Err(file_err(p, "it holds no PEM certificate"));
            }
            Ok(v)
        };
        Ok(TlsIdentity {
            ca: certs(ca)?,
            chain: certs(cert)?,
            key: Arc::new(PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?),
        })
    }

    fn roots(&self) -> Result<RootCertStore, AuthError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .map_err(|e| AuthError::Tls(format!("the CA file: {e}")))?;
        }
        Ok(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn client_config(&self) -> Result<ClientConfig, AuthError> {
        ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)
    }

    fn server_config(&self) -> Result<ServerConfig, AuthError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), Self::provider())
                .build()
                .map_err(|e| AuthError::Tls(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        // The session ends with the handshake: a ticket would arrive among the sealed frames.
        config.send_tls13_tickets = 0;
        Ok(config)
    }
}

fn tls_err(e: rustls::Error) -> AuthError {
    AuthError::Tls(match e {
        rustls::Error::InvalidCertificate(c) => format!(
            "the peer's certificate was refused ({c:?}); both hosts need certificates from the \
             same `godwit ca new`, and the destination's must name the address the source dials \
             (`godwit ca issue --ip`)"
        ),
        rustls::Error::AlertReceived(alert) => format!(
            "the peer refused the handshake ({alert:?}): most likely this host's certificate; \
             both hosts need certificates from the same `godwit ca new`"
        ),
        rustls::Error::NoCertificatesPresented => {
            "the peer presented no certificate; give it --cert, --cert-key and --ca".into()
        }
        other => other.to_string(),
    })
}

/// Runs the handshake of `conn` over `control`'s frames until it completes.
fn drive(conn: &mut Connection, control: &mut Channel) -> Result<(), AuthError> {
    // A bounded number of flights: TLS 1.3 with client certificates takes three.
    for _ in 0..16 {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out)
                .map_err(|e| AuthError::Tls(e.to_string()))?;
            control.sink.send(&[&out])?;
        }
        control.sink.flush()?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        let mut frame = Vec::new();
        if !control.source.recv(&mut frame)? {
            return Err(AuthError::Malformed(
                "the peer closed the connection in the TLS handshake".into(),
            ));
        }
        let mut rd = &frame[..];
        while !rd.is_empty() {
            conn.read_tls(&mut rd)
                .map_err(|e| AuthError::Tls(e.to_string()))?;
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (an alert) before failing.
            let mut out = Vec::new();
            if conn.write_tls(&mut out).is_ok() && !out.is_empty() {
                let _ = control.sink.send(&[&out]);
                let _ = control.sink.flush();
            }
            return Err(tls_err(e));
        }
    }
    Err(AuthError::Malformed("the TLS handshake did not end".into()))
}

fn secret(conn: &Connection, flags: u8) -> Result<[u8; 32], AuthError> {
    let mut out = [0u8; 32];
    match conn {
        Connection::Client(c) => c.export_keying_material(&mut out, EXPORTER_LABEL, Some(&[flags])),
        Connection::Server(s) => s.export_keying_material(&mut out, EXPORTER_LABEL, Some(&[flags])),
    }
    .map_err(tls_err)?;
    Ok(out)
}

/// The source's TLS handshake: returns the session secret (bound to `flags`).
pub(super) fn client(
    id: &TlsIdentity,
    control: &mut Channel,
    flags: u8,
) -> Result<[u8; 32], AuthError> {
    let host = control
        .peer()
        .rsplit_once(':')
        .map_or(control.peer(), |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| AuthError::Tls(format!("the destination {host:?} is no TLS name: {e}")))?;
    let mut conn = Connection::Client(
        ClientConnection::new(Arc::new(id.client_config()?), name).map_err(tls_err)?,
    );
    drive(&mut conn, control)?;
    secret(&conn, flags)
}

/// The destination's TLS handshake: returns the session secret (bound to `flags`).
pub(super) fn server(
    id: &TlsIdentity,
    control: &mut Channel,
    flags: u8,
) -> Result<[u8; 32], AuthError> {
    let mut conn = Connection::Server(
        rustls::ServerConnection::new(Arc::new(id.server_config()?)).map_err(tls_err)?,
    );
    drive(&mut conn, control)?;
    secret(&conn, flags)
}

/// A new CA: its certificate and its private key, in PEM.
pub fn new_ca() -> Result<(String, String), AuthError> {
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = ca_params().self_signed(&key).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// A certificate for a host named `names` (IP addresses or DNS names), signed by the CA
/// whose private key is `ca_key_pem`: the certificate and its private key, in PEM. It serves
/// both as a destination (server) and as a source (client).
pub fn issue(ca_key_pem: &str, names: &[String]) -> Result<(String, String), AuthError> {
    if names.is_empty() {
        return Err(AuthError::Tls(
            "a host certificate needs at least one --ip or --dns".into(),
        ));
    }
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(gen_err)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, names[0].clone());
    p.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(gen_err),
        })
        .collect::<Result<_, _>>()?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn gen_err(e: rcgen::Error) -> AuthError {
    AuthError::Tls(format!("making a certificate failed: {e}"))
}
