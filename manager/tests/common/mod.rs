//! For the tests in this folder: the real `tpvpn-manager` binary on loopback, and a
//! client's side of the hello.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use quinn::rustls::pki_types::CertificateDer;
use tpvpn_tunnel::handshake::{ClientHandshake, ClientStep, Hello};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{Role, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// A running manager, stopped (by its pid) and its files removed when dropped.
pub struct Manager {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
    pub cert: CertificateDer<'static>,
}

impl Manager {
    /// Starts it with a new certificate and `token`, its QUIC port on a free loopback
    /// port (its TCP port, metrics and health on ports of their own), and `args`; waits
    /// until it says it is ready, or panics with what it said.
    pub fn start(token: &str, args: &[&str]) -> Manager {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tpvpn-manager-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["tpvpn-manager".into()]).unwrap();
        std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tpvpn-manager"))
            .args(["--listen", &addr.to_string(), "--metrics-listen", "127.0.0.1:0"])
            // Not the QUIC port's number: a free UDP port may be a TCP port in use.
            .args(["--tcp-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .arg("--token-file")
            .arg(dir.join("token"))
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tpvpn-manager");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut said = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tpvpn-manager ready") {
                    let _ = tx.send(Ok(()));
                }
                said.push_str(&line);
                said.push('\n');
            }
            let _ = tx.send(Err(said));
        });
        let m = Manager { child, dir, addr, cert: ck.cert.der().clone() };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => m,
            Ok(Err(said)) => panic!("tpvpn-manager exited before it was ready:\n{said}"),
            Err(e) => panic!("tpvpn-manager not ready: {e}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client endpoint that trusts this manager's certificate.
    pub fn client_endpoint(&self) -> quinn::Endpoint {
        let mut endpoint = tpvpn_tunnel::quic::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        endpoint.set_default_client_config(tpvpn_tunnel::quic::client_config(self.cert.clone(), false).unwrap());
        endpoint
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The resident memory of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The hello on a new control stream of `conn` as client `user` with `token`: the
/// control stream once accepted, else the step the manager's answer gave.
pub async fn hello(
    conn: &quinn::Connection,
    token: &str,
    user: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream), ClientStep> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut hs = ClientHandshake::new(Hello {
        token: token.as_bytes().to_vec(),
        role: Role::Client,
        user: user.into(),
        host: "test".into(),
        client_id: vec![],
        features: 0,
        versions: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
    });
    for frame in hs.hello_frames() {
        write_message(&mut send, &frame).await.unwrap();
    }
    loop {
        match hs.on_message(read_message(&mut recv).await.unwrap().unwrap()) {
            ClientStep::NeedMore => continue,
            ClientStep::Accepted(_) => return Ok((send, recv)),
            other => return Err(other),
        }
    }
}
