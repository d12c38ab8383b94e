//! Version skew against the real previous release: the `tpvpn-manager` binary of the last
//! commit that spoke only tpvpn protocol v1 (built by `scripts/build-compat.sh` into
//! `target/compat/v1`, which the README's test command runs first). This client must
//! connect to it (falling back to v1) and carry flows; features v1 lacks are refused
//! with a line naming the side to upgrade. (The other direction, the old client against
//! this manager, needs a TUN device: `lab/tests/compat.rs`.) No root needed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpvpn_client::connect::{connect, Target};
use tpvpn_tunnel::io::{read_message, write_message};
use tpvpn_tunnel::{FlowStatus, Message, Protocol};

/// Where `scripts/build-compat.sh` puts the v1 binaries.
pub fn compat_dir() -> PathBuf {
    std::env::var_os("TPVPN_COMPAT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/compat/v1"))
}

struct OldManager {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for OldManager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_old_manager() -> OldManager {
    let bin = compat_dir().join("tpvpn-manager");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/build-compat.sh (the README's test command does)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("tpvpn-compat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["tpvpn-manager".into()]).unwrap();
    std::fs::write(dir.join("manager.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("manager.key"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("token"), "compat-token\n").unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let log = std::fs::File::create(dir.join("manager.log")).unwrap();
    let child = Command::new(bin)
        .args(["--listen", &addr.to_string(), "--metrics-listen", "127.0.0.1:0", "--cluster-cidr", "10.96.0.0/12"])
        .arg("--tls-cert")
        .arg(dir.join("manager.crt"))
        .arg("--tls-key")
        .arg(dir.join("manager.key"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let m = OldManager { child, dir, addr };
    let ready = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::read_to_string(m.dir.join("manager.log")).unwrap_or_default().contains("tpvpn-manager ready")
    });
    assert!(ready, "the v1 manager did not start");
    m
}

#[tokio::test]
async fn this_client_connects_to_a_v1_manager_and_carries_flows() {
    let m = start_old_manager();
    let t = Target::from_files(m.addr.to_string(), &m.dir.join("manager.crt"), &m.dir.join("token")).unwrap();
    let s = connect(&t).await.expect("connects to the v1 manager");
    assert_eq!(s.version.number(), 1, "negotiated down to v1");
    assert_eq!(s.manager_versions, (1, 1));
    assert_eq!(s.cluster.cidrs, vec!["10.96.0.0/12".parse().unwrap()]);

    // A TCP flow, the v1 way.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        sock.read_exact(&mut buf).await.unwrap();
        sock.write_all(&buf).await.unwrap();
    });
    let (mut send, mut recv) = s.conn.open_bi().await.unwrap();
    let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
    write_message(&mut send, &Message::FlowOpen { protocol: Protocol::Tcp, flow_id: 0, src, dst: server })
        .await
        .unwrap();
    assert!(matches!(read_message(&mut recv).await.unwrap(), Some(Message::FlowReply { status: FlowStatus::Ok, .. })));
    send.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    recv.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"hello");

    // The v1 manager's refusals are still understood.
    std::fs::write(m.dir.join("bad-token"), "nope\n").unwrap();
    let bad = Target::from_files(m.addr.to_string(), &m.dir.join("manager.crt"), &m.dir.join("bad-token")).unwrap();
    let e = connect(&bad).await.err().expect("bad token refused");
    assert!(matches!(e, tpvpn_client::Error::BadToken(..)), "{e}");
}

#[tokio::test]
async fn intercepts_against_a_v1_manager_are_refused_naming_the_manager() {
    let m = start_old_manager();
    let t = Target::from_files(m.addr.to_string(), &m.dir.join("manager.crt"), &m.dir.join("token")).unwrap();
    let s = connect(&t).await.expect("connects to the v1 manager");
    let held = tpvpn_client::intercept::Intercepts::load(m.dir.join("intercepts.json"));
    let spec = tpvpn_client::intercept::Spec {
        namespace: "default".into(),
        service: "web".into(),
        port: String::new(),
        local_port: 18888,
        container: String::new(),
        headers: vec![],
        path_prefix: String::new(),
        mount: None,
        mount_readwrite: false,
    };
    let e = held.request(&s.conn, s.version, spec).await.expect_err("no intercepts in v1");
    let line = e.to_string();
    assert!(line.contains("protocol v1") && line.contains("upgrade the manager"), "{line}");
    assert!(held.list().is_empty());
}
