//! DNS message exchange with nameservers over UDP and TCP (feature `io`), used by both
//! ends to forward DNS: the client to the laptop's original nameservers (names that are
//! not the cluster's), the manager to the cluster DNS. The decisions are the sans-IO
//! [`crate::Resolver`]'s; this only moves its messages.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Whether `answer` has the TC (truncated) flag.
pub fn truncated(answer: &[u8]) -> bool {
    answer.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

fn timed_out(server: SocketAddr) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer from {server}"))
}

/// Sends `query` to `server` over UDP (`tries` times, `timeout` each) and returns the
/// first answer with the query's id.
pub async fn over_udp(server: SocketAddr, query: &[u8], timeout: Duration, tries: u32) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    let mut buf = vec![0u8; 65_535];
    for _ in 0..tries {
        socket.send(query).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        while let Ok(r) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            let n = r?;
            if n >= 12 && query.len() >= 2 && buf[..2] == query[..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    }
    Err(timed_out(server))
}

/// Writes one length-prefixed DNS message (RFC 1035, 4.2.2).
pub async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("dns message over 65535 bytes"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

/// Reads one length-prefixed DNS message; `Ok(None)` at a clean end of stream.
pub async fn read_framed(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Sends `query` to `server` over TCP and returns the answer, within `timeout`.
pub async fn over_tcp(server: SocketAddr, query: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut s = TcpStream::connect(server).await?;
        write_framed(&mut s, query).await?;
        read_framed(&mut s).await?.ok_or_else(|| std::io::Error::other("closed before answering"))
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| Err(timed_out(server)))
}
