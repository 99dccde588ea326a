//! The handshake over real loopback TCP.

use std::thread;

use super::*;
use crate::tests::{bounded, pair};

fn opts(key: &Psk, encrypt_data: bool) -> AuthOptions {
    AuthOptions {
        credentials: Credentials::Key(key.clone()),
        encrypt_data,
    }
}

/// Runs both sides of a handshake; returns (client result, server result).
fn handshake(
    client_opts: AuthOptions,
    server_opts: AuthOptions,
    streams: usize,
) -> (Result<Connection, AuthError>, Result<Connection, AuthError>) {
    bounded(move || {
        let (c, s) = pair(streams);
        let server = thread::spawn(move || server(s, &server_opts));
        let client = client(c, &client_opts);
        (client, server.join().expect("server thread"))
    })
}

fn exchange(mut c: Connection, mut s: Connection) {
    let mut buf = Vec::new();
    c.control.sink.send(&[b"hello ", b"server"]).unwrap();
    assert!(s.control.source.recv(&mut buf).unwrap());
    assert_eq!(buf, b"hello server");
    s.control.sink.send(&[b"hello client"]).unwrap();
    assert!(c.control.source.recv(&mut buf).unwrap());
    assert_eq!(buf, b"hello client");
    for (i, (cd, sd)) in c.data.iter_mut().zip(&mut s.data).enumerate() {
        let page = vec![i as u8; 4096];
        cd.sink.send(&[&page]).unwrap();
        cd.sink.flush().unwrap();
        assert!(sd.source.recv(&mut buf).unwrap());
        assert_eq!(buf, page);
    }
}

#[test]
fn the_same_key_opens_sealed_and_plaintext_sessions() {
    let key = Psk::generate().unwrap();
    for encrypt in [true, false] {
        let (c, s) = handshake(opts(&key, encrypt), opts(&key, encrypt), 3);
        exchange(c.expect("client"), s.expect("server"));
    }
}

#[test]
fn a_different_key_is_refused_on_both_sides_with_both_fingerprints() {
    let (a, b) = (Psk::generate().unwrap(), Psk::generate().unwrap());
    let (c, s) = handshake(opts(&a, true), opts(&b, true), 1);
    match c {
        Err(AuthError::WrongKey { theirs, ours }) => {
            assert_eq!(theirs, b.fingerprint());
            assert_eq!(ours, a.fingerprint());
        }
        other => panic!("client: {other:?}"),
    }
    assert!(
        matches!(s, Err(AuthError::WrongKey { .. })),
        "server: {s:?}"
    );
    let msg = AuthError::WrongKey {
        theirs: "x".into(),
        ours: "y".into(),
    }
    .to_string();
    assert!(msg.contains("same --key file"), "{msg}");
}

#[test]
fn a_forged_fingerprint_without_the_key_fails_the_proof() {
    // A client that copies the fingerprint (it travels in the clear) but not the key.
    let real = Psk::generate().unwrap();
    let mut forged = Psk::generate().unwrap();
    let want = real.fingerprint_bytes();
    let (c, s) = bounded(move || {
        let (mut c, s) = pair(1);
        let server_opts = opts(&real, true);
        let server = thread::spawn(move || server(s, &server_opts));
        let mut m1 = header();
        m1.extend_from_slice(&[MODE_KEY, 0]);
        m1.extend_from_slice(&want);
        m1.extend_from_slice(&[9u8; 32]);
        send_msg(&mut *c.control.sink, &m1).unwrap();
        let m2 = recv_msg(&mut *c.control.source, MSG2_LEN).unwrap();
        assert_eq!(m2[6], OK);
        // The forger's proof is keyed with the wrong key.
        forged.0[0] ^= 1;
        let mut m3 = header();
        m3.extend_from_slice(mac(&forged, b"godwit psk v1 client", &[&m2]).as_ref());
        send_msg(&mut *c.control.sink, &m3).unwrap();
        let m4 = recv_msg(&mut *c.control.source, STATUS_LEN).unwrap();
        (m4[6], server.join().unwrap())
    });
    assert_eq!(c, BAD_PROOF);
    assert!(matches!(s, Err(AuthError::BadProof)), "{s:?}");
}

#[test]
fn encryption_must_match_and_garbage_is_refused() {
    let key = Psk::generate().unwrap();
    let (c, s) = handshake(opts(&key, false), opts(&key, true), 1);
    assert!(matches!(
        c,
        Err(AuthError::EncryptionMismatch { source_plain: true })
    ));
    let s = s.unwrap_err().to_string();
    assert!(s.contains("--no-encrypt"), "{s}");

    let (c, s) = bounded(move || {
        let (mut c, s) = pair(1);
        let server = thread::spawn(move || server(s, &opts(&key, true)));
        c.control.sink.send(&[b"GET / HTTP/1.1\r\n\r\n"]).unwrap();
        c.control.sink.flush().unwrap();
        (c, server.join().unwrap())
    });
    drop(c);
    assert!(matches!(s, Err(AuthError::Malformed(_))), "{s:?}");
}

#[test]
fn key_files_round_trip_and_loose_permissions_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("godwit-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("key");
    let key = Psk::generate().unwrap();
    std::fs::write(&path, key.to_file_text()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(Psk::from_file(&path).unwrap().0, key.0);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Psk::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::write(&path, "not a key").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = Psk::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("hex digits"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A CA in a fresh folder, and certificates for 127.0.0.1 from it: (folder, identity).
fn certificates(tag: &str) -> (std::path::PathBuf, TlsIdentity) {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("godwit-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, ca_key) = new_ca().unwrap();
    let (cert, key) = issue(&ca_key, &["127.0.0.1".to_string()]).unwrap();
    for (name, text) in [("ca.pem", &ca), ("host.pem", &cert), ("host.key", &key)] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::set_permissions(dir.join("host.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let id = TlsIdentity::load(
        &dir.join("host.pem"),
        &dir.join("host.key"),
        &dir.join("ca.pem"),
    )
    .unwrap();
    (dir, id)
}

fn tls(id: &TlsIdentity, encrypt_data: bool) -> AuthOptions {
    AuthOptions {
        credentials: Credentials::Certificate(id.clone()),
        encrypt_data,
    }
}

#[test]
fn certificates_from_one_ca_open_a_session() {
    let (dir, id) = certificates("ok");
    for encrypt in [true, false] {
        let (c, s) = handshake(tls(&id, encrypt), tls(&id, encrypt), 2);
        exchange(c.expect("client"), s.expect("server"));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_certificate_from_another_ca_is_refused_on_both_sides() {
    let (d1, ours) = certificates("ca1");
    let (d2, theirs) = certificates("ca2");
    let (c, s) = handshake(tls(&theirs, true), tls(&ours, true), 1);
    let c = c.unwrap_err().to_string();
    let s = s.unwrap_err().to_string();
    assert!(c.contains("TLS") || c.contains("closed"), "client: {c}");
    assert!(s.contains("certificate"), "server: {s}");
    // A key on one side and a certificate on the other: told plainly.
    let key = Psk::generate().unwrap();
    let (c, s) = handshake(opts(&key, true), tls(&ours, true), 1);
    assert!(
        matches!(
            c,
            Err(AuthError::ModeMismatch {
                source_certificate: false
            })
        ),
        "{c:?}"
    );
    assert!(matches!(s, Err(AuthError::ModeMismatch { .. })), "{s:?}");
    std::fs::remove_dir_all(d1).unwrap();
    std::fs::remove_dir_all(d2).unwrap();
}

#[test]
fn a_certificate_for_another_address_is_refused_by_the_source() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, client_id) = certificates("name");
    // The destination's certificate names 10.9.9.9, but the source dials 127.0.0.1.
    let ca_key_dir = std::env::temp_dir().join(format!("godwit-tls-other-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ca_key_dir);
    std::fs::create_dir_all(&ca_key_dir).unwrap();
    let (ca, ca_key) = new_ca().unwrap();
    let (cert, key) = issue(&ca_key, &["10.9.9.9".to_string()]).unwrap();
    let (ccert, ckey) = issue(&ca_key, &["127.0.0.1".to_string()]).unwrap();
    for (name, text) in [
        ("ca.pem", &ca),
        ("s.pem", &cert),
        ("s.key", &key),
        ("c.pem", &ccert),
        ("c.key", &ckey),
    ] {
        std::fs::write(ca_key_dir.join(name), text).unwrap();
    }
    for k in ["s.key", "c.key"] {
        std::fs::set_permissions(ca_key_dir.join(k), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    let load = |c: &str, k: &str| {
        TlsIdentity::load(
            &ca_key_dir.join(c),
            &ca_key_dir.join(k),
            &ca_key_dir.join("ca.pem"),
        )
        .unwrap()
    };
    let (c, _s) = handshake(
        tls(&load("c.pem", "c.key"), true),
        tls(&load("s.pem", "s.key"), true),
        1,
    );
    let c = c.unwrap_err().to_string();
    assert!(c.contains("--ip"), "{c}");
    drop(client_id);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(ca_key_dir).unwrap();
}
