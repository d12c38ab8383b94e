//! DNS queries from clients for names only the cluster knows: forwarded to the cluster
//! DNS over UDP (one retry), and over TCP when the UDP answer is truncated. The answer is
//! passed back unchanged.

use std::net::SocketAddr;
use std::time::Duration;

use tpvpn_resolver::upstream::{over_tcp, over_udp, truncated};
use tpvpn_tunnel::io::write_message;
use tpvpn_tunnel::{ErrorCode, Message, PROTOCOL_VERSION};
use tracing::debug;

use crate::Config;

const UDP_TIMEOUT: Duration = Duration::from_millis(1500);
const TCP_TIMEOUT: Duration = Duration::from_secs(3);

/// Resolves `query` with the cluster DNS at `server`.
pub async fn lookup(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let answer = over_udp(server, query, UDP_TIMEOUT, 2).await?;
    if truncated(&answer) {
        return over_tcp(server, query, TCP_TIMEOUT).await;
    }
    Ok(answer)
}

/// Answers one DNS stream.
pub(crate) async fn answer(mut send: quinn::SendStream, query: Vec<u8>, config: &Config) {
    let server = config.views.cluster.borrow().dns.map(|ip| SocketAddr::new(ip, 53));
    let reply = match server {
        None => Err("the manager does not know the cluster DNS (give --cluster-dns)".to_string()),
        Some(server) => lookup(server, &query).await.map_err(|e| format!("cluster DNS {server}: {e}")),
    };
    let msg = match reply {
        Ok(answer) => Message::DnsAnswer { answer },
        Err(message) => {
            debug!(%message, "dns query failed");
            Message::Error { code: ErrorCode::Unavailable, version: PROTOCOL_VERSION, message }
        }
    };
    let _ = write_message(&mut send, &msg).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UdpSocket;

    #[tokio::test]
    async fn truncated_udp_answers_are_retried_over_tcp() {
        // A tiny DNS server on loopback: truncated over UDP, whole over TCP.
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = udp.recv_from(&mut buf).await.unwrap();
            let mut answer = buf[..n].to_vec();
            answer[2] |= 0x82; // QR and TC
            udp.send_to(&answer, from).await.unwrap();
        });
        tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.unwrap();
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut q).await.unwrap();
            let mut answer = q.clone();
            answer[2] |= 0x80;
            answer.extend_from_slice(&[0xAB; 1000]);
            s.write_all(&(answer.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&answer).await.unwrap();
        });
        let query = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let answer = lookup(addr, &query).await.unwrap();
        assert_eq!(answer.len(), 12 + 1000);
        assert_eq!(&answer[..2], &[0x12, 0x34]);
        assert!(!truncated(&answer));
    }

    #[tokio::test]
    async fn silence_is_a_timeout() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let e = lookup(silent.local_addr().unwrap(), &[1, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }
}
