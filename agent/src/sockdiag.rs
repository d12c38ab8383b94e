//! Whether a TCP 4-tuple is taken in the calling thread's network namespace, asked of the
//! kernel's socket table (`NETLINK_SOCK_DIAG`, one exact lookup, as `ss` does with
//! filters): the agent's transparent-source connections to a pod's app pick a source
//! port the kernel offers, and one that equals the port of a caller's live connection to
//! the same app would land in that connection (see [`crate::upstream::Upstream::app`]).
//!
//! The messages are built and read here as bytes ([`request`], [`parse_reply`]); only
//! [`taken`] talks to the kernel.

use std::net::{IpAddr, SocketAddr};

use nix::sys::socket::{recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

use crate::{Error, Result};

/// `SOCK_DIAG_BY_FAMILY`, `NLMSG_ERROR`, `NLM_F_REQUEST`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `sizeof(struct nlmsghdr)` and `sizeof(struct inet_diag_req_v2)`.
const HEADER: usize = 16;
const REQUEST: usize = 56;
/// `TCP_LISTEN`: a listening socket matches any remote end, and is no collision.
const TCP_LISTEN: u8 = 10;

/// The lookup of the TCP socket whose local end is `local` and remote end `remote`.
pub fn request(seq: u32, local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + REQUEST);
    m.extend_from_slice(&((HEADER + REQUEST) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // family, protocol, extensions, pad; every state.
    m.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network order, no interface, no
    // cookie (INET_DIAG_NOCOOKIE).
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    for ip in [local.ip(), remote.ip()] {
        let mut a = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => a = v6.octets(),
        }
        m.extend_from_slice(&a);
    }
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m
}

/// Reads the kernel's answer to [`request`]: whether a socket other than a listener has
/// that 4-tuple. Anything but a socket found or "no such socket" is an error.
pub fn parse_reply(reply: &[u8]) -> Result<bool> {
    let bad = |why: &str| Error::Netns(format!("socket diagnostics: {why}"));
    if reply.len() < HEADER {
        return Err(bad("short reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    match kind {
        NLMSG_ERROR => {
            let code = reply.get(HEADER..HEADER + 4).ok_or_else(|| bad("short error"))?;
            match -i32::from_ne_bytes([code[0], code[1], code[2], code[3]]) {
                libc::ENOENT => Ok(false),
                0 => Err(bad("an acknowledgement, not an answer")),
                errno => Err(bad(&nix::errno::Errno::from_raw(errno).to_string())),
            }
        }
        // struct inet_diag_msg: family, then the socket's state.
        SOCK_DIAG_BY_FAMILY => {
            reply.get(HEADER + 1).map(|&state| state != TCP_LISTEN).ok_or_else(|| bad("short answer"))
        }
        other => Err(bad(&format!("unexpected message type {other}"))),
    }
}

/// Whether the TCP 4-tuple (`local`, `remote`) is taken in the calling thread's network
/// namespace.
pub fn taken(local: SocketAddr, remote: SocketAddr) -> Result<bool> {
    let io = |e: nix::Error| Error::Netns(format!("socket diagnostics: {e}"));
    let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkSockDiag)
        .map_err(io)?;
    sendto(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &request(1, local, remote),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io)?;
    let mut buf = [0u8; 512];
    let n = recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf, MsgFlags::empty()).map_err(io)?;
    parse_reply(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_is_an_exact_inet_diag_request() {
        let m = request(7, "10.244.2.10:8080".parse().unwrap(), "10.244.2.20:40000".parse().unwrap());
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(&m[24..26], &8080u16.to_be_bytes(), "the local port first");
        assert_eq!(&m[26..28], &40000u16.to_be_bytes());
        assert_eq!(&m[28..32], &[10, 244, 2, 10]);
        assert_eq!(&m[44..48], &[10, 244, 2, 20]);
        assert_eq!(&m[64..72], &[0xff; 8], "no cookie");
    }

    #[test]
    fn replies_say_taken_free_or_why_not() {
        let header = |kind: u16| {
            let mut h = vec![0u8; HEADER];
            h[4..6].copy_from_slice(&kind.to_ne_bytes());
            h
        };
        let mut enoent = header(NLMSG_ERROR);
        enoent.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert!(!parse_reply(&enoent).unwrap());
        let mut found = header(SOCK_DIAG_BY_FAMILY);
        found.extend_from_slice(&[libc::AF_INET as u8, 1]);
        assert!(parse_reply(&found).unwrap(), "an established socket");
        found[HEADER + 1] = TCP_LISTEN;
        assert!(!parse_reply(&found).unwrap(), "a listener is no collision");
        let mut eperm = header(NLMSG_ERROR);
        eperm.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert!(parse_reply(&eperm).is_err());
        assert!(parse_reply(&header(99)).is_err());
        assert!(parse_reply(&[1, 2]).is_err());
    }

    /// A loopback connection of the test's own is found from both ends; a remote end
    /// nobody uses finds only the listener, which is no collision.
    #[test]
    fn the_kernel_answers_for_a_live_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (_accepted, from) = listener.accept().unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        assert!(taken(server, from).unwrap(), "the server's end");
        assert!(taken(from, server).unwrap(), "the client's end");
        // Only the listener has the server's end with this remote end: free.
        let nobody: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 1).into();
        assert!(!taken(server, nobody).unwrap());
    }
}
