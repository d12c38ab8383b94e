//! A real manager on loopback for the client's tests: real QUIC, TLS and sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tpvpn_client::connect::Target;

pub struct Fixture {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    /// The manager's TCP port (QUIC over a stream).
    pub tcp_addr: SocketAddr,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn write_cert(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["tpvpn-manager".into()]).unwrap();
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, ck.cert.pem()).unwrap();
    std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
    (c, k)
}

pub async fn start_manager(tag: &str) -> Fixture {
    start_manager_with(tag, |c| c.policy = tpvpn_manager::policy::Policy::allow_all()).await
}

/// A manager on loopback; `adjust` changes its configuration (these tests dial servers
/// on loopback, which the default destination policy denies).
pub async fn start_manager_with(tag: &str, adjust: impl FnOnce(&mut tpvpn_manager::Config)) -> Fixture {
    let dir = std::env::temp_dir().join(format!("tpvpn-session-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = write_cert(&dir, "manager");
    std::fs::write(dir.join("token"), "good-token\n").unwrap();
    std::fs::write(dir.join("bad-token"), "bad-token\n").unwrap();
    let server = tpvpn_tunnel::quic::server_config(
        tpvpn_tunnel::quic::load_certs(&cert).unwrap(),
        tpvpn_tunnel::quic::load_key(&key).unwrap(),
    )
    .unwrap();
    let endpoint = tpvpn_manager::bind("127.0.0.1:0".parse().unwrap(), server.clone()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let mut config = tpvpn_manager::Config::new(
        b"good-token".to_vec(),
        vec!["10.96.0.0/12".parse().unwrap()],
        Some("10.96.0.10".parse().unwrap()),
        "cluster.local".into(),
    );
    config.dial_timeout = Duration::from_secs(2);
    adjust(&mut config);
    let manager = tpvpn_manager::Server::new(config);
    tokio::spawn(manager.clone().serve_tcp(tcp, server.clone()));
    tokio::spawn(manager.serve_quic(endpoint, server));
    Fixture { dir, addr, tcp_addr }
}

pub fn target(f: &Fixture, ca: &str, token: &str) -> Target {
    Target::from_files(f.addr.to_string(), &f.dir.join(ca), &f.dir.join(token)).unwrap()
}
