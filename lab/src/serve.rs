//! The lab's own test servers (`tpvpn-lab serve`): UDP echo, reset, sink and source.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::data::{DataStream, Fnv1a};

/// Where each server listens; the servers not given are not run.
#[derive(Debug, Clone, Default)]
pub struct ServeAddrs {
    pub udp_echo: Option<SocketAddr>,
    pub reset: Option<SocketAddr>,
    pub sink: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    /// Accepts and then neither reads nor writes, until the peer goes.
    pub silent: Option<SocketAddr>,
}

/// Binds every server, then serves until the process is killed.
pub fn run(addrs: ServeAddrs) -> Result<()> {
    crate::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut servers = tokio::task::JoinSet::new();
        if let Some(a) = addrs.udp_echo {
            servers.spawn(udp_echo(UdpSocket::bind(a).await.with_context(|| format!("bind udp {a}"))?));
        }
        if let Some(a) = addrs.reset {
            servers.spawn(accept_loop(bind_tcp(a).await?, reset_conn));
        }
        if let Some(a) = addrs.sink {
            servers.spawn(accept_loop(bind_tcp(a).await?, sink_conn));
        }
        if let Some(a) = addrs.source {
            servers.spawn(accept_loop(bind_tcp(a).await?, source_conn));
        }
        if let Some(a) = addrs.silent {
            servers.spawn(accept_loop(bind_tcp(a).await?, silent_conn));
        }
        eprintln!("tpvpn-lab serve: ready {addrs:?}");
        // Runs until one fails.
        while let Some(r) = servers.join_next().await {
            r??;
        }
        Ok(())
    })
}

/// A stand-in for a service mesh's inbound sidecar (what istio-init and Envoy do to a
/// pod, reduced to the part that matters here): the lab's nat REDIRECT sends the pod's
/// inbound TCP to `listen`; each connection is relayed to its original destination port
/// on the pod's loopback, as the mesh proxy does after it has handled mTLS. Prints one
/// line per connection relayed, so that tests see the traffic pass through it.
pub fn sidecar(listen: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = bind_tcp(listen).await?;
        eprintln!("tpvpn-lab sidecar: ready on {listen}");
        loop {
            let (inbound, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let original = socket2::SockRef::from(&inbound).original_dst_v4().ok().and_then(|a| a.as_socket());
                let Some(original) = original else {
                    eprintln!("sidecar: no original destination for {peer}");
                    return;
                };
                let app = SocketAddr::from(([127, 0, 0, 1], original.port()));
                println!("sidecar: {peer} -> {original} via {app}");
                match TcpStream::connect(app).await {
                    Ok(mut app_conn) => {
                        let mut inbound = inbound;
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut app_conn).await;
                    }
                    Err(e) => eprintln!("sidecar: {app}: {e}"),
                }
            });
        }
    })
}

/// A plain byte relay, the benchmarks' reference for what any userspace proxy in a
/// connection's path costs: each connection accepted on `listen` is joined to a new one
/// to `to` (TCP_NODELAY both), on two worker threads as the agent's default.
pub fn relay(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = bind_tcp(listen).await?;
        eprintln!("tpvpn-lab relay: ready on {listen} to {to}");
        accept_loop(listener, move |mut caller| async move {
            let mut upstream = TcpStream::connect(to).await?;
            caller.set_nodelay(true)?;
            upstream.set_nodelay(true)?;
            tokio::io::copy_bidirectional(&mut caller, &mut upstream).await.map(|_| ())
        })
        .await
    })
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr).with_context(|| format!("bind tcp {addr}"))?;
    Ok(sock.listen(4096)?)
}

/// Accepts forever, handling each connection in its own task; per-connection
/// errors are logged, not fatal.
async fn accept_loop<F, Fut>(listener: TcpListener, handler: F) -> Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let fut = handler(stream);
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

/// Echoes each datagram's payload back to its sender.
async fn udp_echo(sock: UdpSocket) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                if let Err(e) = sock.send_to(&buf[..n], peer).await {
                    eprintln!("udp echo to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("udp recv: {e}"),
        }
    }
}

/// Writes 1000 bytes, then closes with SO_LINGER 0 so the peer gets a RST.
async fn reset_conn(mut stream: TcpStream) -> std::io::Result<()> {
    stream.write_all(&[b'r'; 1000]).await?;
    stream.set_zero_linger()?;
    drop(stream);
    Ok(())
}

/// Reads until EOF while hashing, then replies `"<bytecount> <hash-hex>\n"`.
async fn sink_conn(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut hash = Fnv1a::new();
    let mut count: u64 = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        count += n as u64;
    }
    stream.write_all(format!("{count} {}\n", hash.hex()).as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Holds the connection and never reads or writes (a server that hangs), for an hour
/// at most.
async fn silent_conn(stream: TcpStream) -> std::io::Result<()> {
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    drop(stream);
    Ok(())
}

/// Reads an 8-byte big-endian count N, writes N bytes of the data stream, closes.
async fn source_conn(mut stream: TcpStream) -> std::io::Result<()> {
    let mut n = [0u8; 8];
    stream.read_exact(&mut n).await?;
    let mut left = u64::from_be_bytes(n);
    let mut data = DataStream::new();
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        data.fill(&mut buf[..len]);
        stream.write_all(&buf[..len]).await?;
        left -= len as u64;
    }
    stream.shutdown().await?;
    Ok(())
}
