//! The lab's test clients (`tpvpn-lab client ...`). Each returns an
//! [`Outcome`]: the line to print and whether the check passed.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::data::{DataStream, Fnv1a};

/// Idle timeout on every blocking socket operation, so nothing hangs forever.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of a single TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client prints on stdout, and whether the check passed (exit 0).
#[derive(Debug)]
pub struct Outcome {
    pub line: String,
    pub ok: bool,
}

impl Outcome {
    fn ok(line: impl Into<String>) -> Self {
        Outcome { line: line.into(), ok: true }
    }
    fn fail(line: impl Into<String>) -> Self {
        Outcome { line: line.into(), ok: false }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    connect_raw(addr).with_context(|| format!("connect {addr}"))
}

fn connect_raw(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn mbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

/// Sends `bytes` of the data stream to the sink, half-closes, and checks the
/// sink's `"<count> <hash>"` reply against what was sent.
pub fn upload(addr: SocketAddr, bytes: u64) -> Result<Outcome> {
    let start = Instant::now();
    let mut s = connect(addr)?;
    let mut data = DataStream::new();
    let mut hash = Fnv1a::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        data.fill(&mut buf[..len]);
        hash.update(&buf[..len]);
        s.write_all(&buf[..len]).with_context(|| format!("write after {} bytes", bytes - left))?;
        left -= len as u64;
    }
    s.shutdown(Shutdown::Write).context("half-close")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).context("reading the sink's reply after half-close")?;
    let elapsed = start.elapsed();
    let expected = format!("{bytes} {}", hash.hex());
    if reply.trim_end() != expected {
        return Ok(Outcome::fail(format!("mismatch: sent {expected:?}, sink replied {reply:?}")));
    }
    Ok(Outcome::ok(format!("ok {bytes} {:.1}", mbit_per_s(bytes, elapsed))))
}

/// Asks the source for `bytes` bytes and checks they are exactly the data stream.
pub fn download(addr: SocketAddr, bytes: u64) -> Result<Outcome> {
    let start = Instant::now();
    let mut s = connect(addr)?;
    s.write_all(&bytes.to_be_bytes()).context("sending the count")?;
    let mut data = DataStream::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut expect = vec![0u8; 64 * 1024];
    let mut got: u64 = 0;
    loop {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) => bail!("read after {got} of {bytes} bytes: {e}"),
        };
        if n == 0 {
            break;
        }
        if got + n as u64 > bytes {
            return Ok(Outcome::fail(format!("mismatch: got more than the {bytes} bytes asked for")));
        }
        data.fill(&mut expect[..n]);
        if buf[..n] != expect[..n] {
            let i = buf[..n].iter().zip(&expect[..n]).position(|(a, b)| a != b).unwrap_or(0);
            return Ok(Outcome::fail(format!("mismatch: wrong byte at offset {}", got + i as u64)));
        }
        got += n as u64;
    }
    if got != bytes {
        return Ok(Outcome::fail(format!("mismatch: got {got} bytes, expected {bytes}")));
    }
    Ok(Outcome::ok(format!("ok {bytes} {:.1}", mbit_per_s(bytes, start.elapsed()))))
}

/// Opens `n` connections to the sink at once, then sends a unique payload on
/// each, half-closes and checks every reply. Bounded to 60 s in total.
pub fn many(addr: SocketAddr, n: usize) -> Result<Outcome> {
    crate::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        match tokio::time::timeout(Duration::from_secs(60), many_async(addr, n)).await {
            Ok(r) => r,
            Err(_) => Ok(Outcome::fail(format!("timeout: {n} connections did not finish within 60 s"))),
        }
    })
}

async fn many_async(addr: SocketAddr, n: usize) -> Result<Outcome> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinSet;

    // Phase 1: connect all.
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(20), tokio::net::TcpStream::connect(addr)).await;
            (i, r)
        });
    }
    let mut streams = Vec::with_capacity(n);
    let mut errors: Vec<String> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r? {
            (i, Ok(Ok(s))) => streams.push((i, s)),
            (i, Ok(Err(e))) => errors.push(format!("conn {i}: connect: {e}")),
            (i, Err(_)) => errors.push(format!("conn {i}: connect timeout")),
        }
    }
    // Phase 2: every connection is open now; exchange on all of them.
    let mut set = JoinSet::new();
    for (i, mut s) in streams {
        set.spawn(async move {
            let payload = format!("tpvpn-lab connection {i} of many\n").repeat(1 + i % 7);
            let mut hash = Fnv1a::new();
            hash.update(payload.as_bytes());
            let expected = format!("{} {}", payload.len(), hash.hex());
            let r: std::io::Result<String> = async {
                s.write_all(payload.as_bytes()).await?;
                s.shutdown().await?;
                let mut reply = String::new();
                s.read_to_string(&mut reply).await?;
                Ok(reply)
            }
            .await;
            match r {
                Ok(reply) if reply.trim_end() == expected => Ok(()),
                Ok(reply) => Err(format!("conn {i}: expected {expected:?}, got {reply:?}")),
                Err(e) => Err(format!("conn {i}: {e}")),
            }
        });
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r? {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(Outcome::ok(format!("ok {n}")))
    } else {
        let shown: Vec<&str> = errors.iter().take(5).map(String::as_str).collect();
        Ok(Outcome::fail(format!("failed {} of {n}; first: {}", errors.len(), shown.join("; "))))
    }
}

/// Reads from the reset server until error or EOF: `reset` passes, `clean-close` fails.
pub fn reset(addr: SocketAddr) -> Result<Outcome> {
    let mut s = match connect_raw(addr) {
        Ok(s) => s,
        // connect_timeout reads SO_ERROR after the handshake, so a reset that
        // arrives that quickly surfaces here. A refused SYN would be ECONNREFUSED.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            eprintln!("reset right after connecting");
            return Ok(Outcome::ok("reset"));
        }
        Err(e) => bail!("connect {addr}: {e}"),
    };
    let mut buf = [0u8; 4096];
    let mut got = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                eprintln!("clean close after {got} bytes");
                return Ok(Outcome::fail("clean-close"));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                eprintln!("reset after {got} bytes");
                return Ok(Outcome::ok("reset"));
            }
            Err(e) => return Ok(Outcome::fail(format!("error after {got} bytes: {e}"))),
        }
    }
}

/// Sends one datagram of `size` data-stream bytes and waits for the identical
/// echo: up to 3 sends, 1 s apart (3 s in total).
pub fn udp(addr: SocketAddr, size: usize) -> Result<Outcome> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("bind udp")?;
    sock.connect(addr).with_context(|| format!("connect udp {addr}"))?;
    let mut payload = vec![0u8; size];
    DataStream::new().fill(&mut payload);
    let mut buf = vec![0u8; 65536];
    let mut last = String::from("no reply");
    for _ in 0..3 {
        sock.send(&payload).with_context(|| format!("send {size} bytes"))?;
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            sock.set_read_timeout(Some(deadline - now))?;
            match sock.recv(&mut buf) {
                Ok(n) if buf[..n] == payload[..] => return Ok(Outcome::ok(format!("ok {size}"))),
                Ok(n) => last = format!("got a different datagram of {n} bytes"),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => last = format!("recv: {e}"),
            }
        }
    }
    Ok(Outcome::fail(format!("no echo of {size} bytes within 3 s ({last})")))
}

/// One TCP connect with a 5 s timeout; always "passes", the caller reads the line.
pub fn connect_probe(addr: SocketAddr) -> Result<Outcome> {
    let start = Instant::now();
    let line = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(_) => format!("connected {}", start.elapsed().as_millis()),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            format!("refused {}", start.elapsed().as_millis())
        }
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => "timeout".to_string(),
        Err(e) => format!("error {e}"),
    };
    Ok(Outcome::ok(line))
}

/// Connects, sends `bytes`, half-closes, then holds the connection until it ends or
/// `hold_for` passes.
pub fn half_close(addr: SocketAddr, bytes: usize, hold_for: Duration) -> Result<Outcome> {
    let mut s = connect(addr)?;
    s.write_all(&vec![b'h'; bytes]).context("write")?;
    s.shutdown(Shutdown::Write).context("half-close")?;
    println!("half-closed");
    std::io::stdout().flush()?;
    s.set_read_timeout(Some(hold_for))?;
    let mut buf = [0u8; 4096];
    let line = loop {
        match s.read(&mut buf) {
            Ok(0) => break "closed".to_string(),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break "held".to_string(),
            Err(e) => break format!("ended: {e}"),
        }
    };
    Ok(Outcome::ok(line))
}

/// Opens `n` connections (at most [`HOLD_IN_FLIGHT`] connecting at once), prints
/// `established <ok> of <n>` as soon as every attempt finished, then keeps them open
/// and idle until stdin reaches EOF or `hold_for` passes. Used by the scale benchmark.
pub fn hold(addr: SocketAddr, n: usize, hold_for: Duration) -> Result<Outcome> {
    crate::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let streams = rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            if set.len() >= HOLD_IN_FLIGHT {
                if let Some(Ok(Ok(Ok(s)))) = set.join_next().await {
                    streams.push(s);
                }
            }
            set.spawn(tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)));
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Ok(Ok(s))) = r {
                streams.push(s);
            }
        }
        streams
    });
    println!("established {} of {n}", streams.len());
    std::io::stdout().flush()?;
    // Wait for stdin to close, bounded by `hold_for`.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(hold_for);
    let held = streams.len();
    drop(streams);
    Ok(Outcome { line: format!("released {held}"), ok: held == n })
}

/// Connection attempts in flight at once in [`hold`].
const HOLD_IN_FLIGHT: usize = 256;

/// A local flood, bounded in count: `queries` DNS queries for distinct names (under
/// `example.com`, so they go upstream) sent to `dns` without waiting for answers, and one
/// datagram from each of `flows` fresh UDP sockets to `udp` (each a new UDP flow).
/// Prints what it sent.
pub fn flood(dns: SocketAddr, queries: usize, udp: SocketAddr, flows: usize) -> Result<Outcome> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("bind udp")?;
    sock.set_nonblocking(true)?;
    let mut sent = 0;
    for i in 0..queries {
        // A minimal query: id, RD, one question (A, IN).
        let mut q = vec![(i >> 8) as u8, i as u8, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in [format!("r{i}x{}", std::process::id()), "example".into(), "com".into()] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        if sock.send_to(&q, dns).is_ok() {
            sent += 1;
        }
        let mut buf = [0u8; 512];
        while sock.recv_from(&mut buf).is_ok() {}
    }
    let mut opened = 0;
    for _ in 0..flows {
        let s = UdpSocket::bind("0.0.0.0:0").context("bind udp")?;
        if s.send_to(b"flood", udp).is_ok() {
            opened += 1;
        }
    }
    Ok(Outcome::ok(format!("flooded {sent} queries {opened} flows")))
}

/// Opens `n` connections to the Unix socket `path` that say nothing, prints
/// `connected <n>`, holds them for `hold_for`, then closes them (a local user crowding a
/// daemon's control socket).
pub fn hold_unix(path: &std::path::Path, n: usize, hold_for: Duration) -> Result<Outcome> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => held.push(s),
            Err(e) => return Ok(Outcome::fail(format!("connect {}: {e}", path.display()))),
        }
    }
    println!("connected {}", held.len());
    std::io::stdout().flush()?;
    std::thread::sleep(hold_for);
    Ok(Outcome::ok(format!("released {}", held.len())))
}
