//! The lab's own test servers (`tpvpn-lab serve`): UDP echo, reset, sink and source.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::data::{DataStream, Fnv1a};

/// Where each server listens.
#[derive(Debug, Clone)]
pub struct ServeAddrs {
    pub udp_echo: SocketAddr,
    pub reset: SocketAddr,
    pub sink: SocketAddr,
    pub source: SocketAddr,
}

/// Binds every server, then serves until the process is killed.
pub fn run(addrs: ServeAddrs) -> Result<()> {
    crate::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let udp = UdpSocket::bind(addrs.udp_echo).await.with_context(|| format!("bind udp {}", addrs.udp_echo))?;
        let reset = bind_tcp(addrs.reset).await?;
        let sink = bind_tcp(addrs.sink).await?;
        let source = bind_tcp(addrs.source).await?;
        eprintln!("tpvpn-lab serve: ready {addrs:?}");
        tokio::try_join!(
            udp_echo(udp),
            accept_loop(reset, reset_conn),
            accept_loop(sink, sink_conn),
            accept_loop(source, source_conn),
        )?;
        Ok(())
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
