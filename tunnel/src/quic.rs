//! QUIC settings shared by the client and the manager: TLS 1.3 only, the tpvpn ALPN,
//! a verifier that pins the manager's exact certificate, transport windows sized for
//! a VPN, and UDP sockets with large kernel buffers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::{Error, Result, ALPN};

/// Server name the client presents; the pinned certificate, not the name, is what is
/// checked.
pub const SERVER_NAME: &str = "tpvpn-manager";

/// Streams a client may have open at once (one per TCP or UDP flow), at most.
pub const MAX_CONCURRENT_STREAMS: u32 = 32_768;
/// Streams granted at first. quinn allocates the state of every stream it allows the
/// peer up front (~80 bytes each, both directions), so allowing 32,768 at once cost
/// 2.6 MiB per connection; the grant is widened as the peer uses it ([`StreamGrant`]).
pub const INITIAL_STREAMS: u32 = 1024;
/// Per-stream receive window: one flow may have this much unacknowledged data in flight
/// (covers 1 Gbit/s at 60 ms RTT).
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Connection-wide receive and send windows.
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Kernel buffer size asked for on the QUIC UDP socket.
pub const SOCKET_BUFFER: usize = 8 << 20;
/// Idle timeout of the QUIC connection (keep-alives are sent well within it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Until its token is accepted a client may open this many bidirectional streams (the
/// control stream)...
pub const PREAUTH_STREAMS: u32 = 1;
/// ...and send this many bytes in all: room for a hello, nothing more. The full limits
/// are granted with [`grant_full_limits`] once the token is accepted.
pub const PREAUTH_WINDOW: u32 = 32 * 1024;
/// Bytes the server buffers for one connection whose handshake has not completed, and
/// for all of them together (quinn's defaults are 10 MiB and 100 MiB).
const INCOMING_BUFFER: u64 = 64 * 1024;
const INCOMING_BUFFER_TOTAL: u64 = 8 << 20;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport parameters tuned for carrying many flows of a VPN.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(INITIAL_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .datagram_receive_buffer_size(Some(SOCKET_BUFFER))
        .datagram_send_buffer_size(SOCKET_BUFFER)
        .keep_alive_interval(Some(KEEP_ALIVE))
        // Cubic that shrugs off light random loss (see `cc`).
        .congestion_controller_factory(Arc::new(crate::cc::LossTolerantCubicConfig::default()));
    // Invariant: 30 s is far below the varint limit of an idle timeout.
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("30 s fits an idle timeout")));
    t
}

/// The server's transport parameters: those of [`transport_config`], except that a new
/// connection may open only [`PREAUTH_STREAMS`] stream and send [`PREAUTH_WINDOW`] bytes
/// until [`grant_full_limits`] is called for it.
fn server_transport_config() -> TransportConfig {
    let mut t = transport_config();
    t.max_concurrent_bidi_streams(VarInt::from_u32(PREAUTH_STREAMS)).receive_window(VarInt::from_u32(PREAUTH_WINDOW));
    t
}

/// Raises an authenticated connection's limits to those of [`transport_config`].
pub fn grant_full_limits(conn: &quinn::Connection) -> StreamGrant {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(INITIAL_STREAMS));
    conn.set_receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    StreamGrant { granted: INITIAL_STREAMS }
}

/// How many concurrent streams the peer may open: doubled (up to
/// [`MAX_CONCURRENT_STREAMS`]) whenever it has half of them open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamGrant {
    granted: u32,
}

impl StreamGrant {
    /// The peer has `open` streams open: widen the grant if that is half of it.
    pub fn in_use(&mut self, conn: &quinn::Connection, open: usize) {
        if open.saturating_mul(2) >= self.granted as usize && self.granted < MAX_CONCURRENT_STREAMS {
            self.granted = (self.granted * 2).min(MAX_CONCURRENT_STREAMS);
            conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.granted));
        }
    }

    pub fn granted(&self) -> u32 {
        self.granted
    }
}

/// Reads all PEM certificates of `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Stream(format!("cannot read certificate {}: {e}", path.display())))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Stream(format!("cannot parse certificate {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Stream(format!("no PEM certificate in {}", path.display())));
    }
    Ok(certs)
}

/// Parses PEM certificates from memory (say, a Secret's `ca.crt`); `what` names the
/// source in errors.
pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Stream(format!("cannot parse certificate from {what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Stream(format!("no PEM certificate in {what}")));
    }
    Ok(certs)
}

/// Reads the PEM private key of `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::Stream(format!("cannot read private key {}: {e}", path.display())))
}

/// Server-side QUIC configuration from the manager's certificate chain and key.
pub fn server_config(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Stream(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Stream(format!("certificate and key do not fit together: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| Error::Stream(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(server_transport_config()))
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// The server configuration for a stream carrier ([`crate::stream`]): `server`'s TLS
/// and limits, with [`crate::stream::STREAM_MTU`]-byte packets.
pub fn stream_server_config(server: &quinn::ServerConfig) -> quinn::ServerConfig {
    let mut t = server_transport_config();
    crate::stream::tune_transport(&mut t);
    let mut cfg = server.clone();
    cfg.transport_config(Arc::new(t));
    cfg
}

/// Client-side QUIC configuration that accepts exactly the certificate `pinned`; with
/// `over_stream`, for a stream carrier ([`crate::stream`]).
pub fn client_config(pinned: CertificateDer<'static>, over_stream: bool) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = PinnedCert { cert: pinned, provider: provider.clone() };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Stream(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| Error::Stream(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // The manager opens a stream per intercepted connection toward a client: a laptop
    // allows all of them (the per-stream memory is the laptop's own, for one connection).
    let mut t = transport_config();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS));
    if over_stream {
        crate::stream::tune_transport(&mut t);
    }
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// A UDP socket bound to `addr` with large kernel buffers, for a quinn endpoint.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    socket.set_recv_buffer_size(SOCKET_BUFFER).ok();
    socket.set_send_buffer_size(SOCKET_BUFFER).ok();
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Builds a quinn endpoint on `addr`, a server if `server` is given.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr)?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, Arc::new(quinn::TokioRuntime))
}

/// Accepts the one certificate the client was given (from Secret `tpvpn-client` or
/// `--manager-ca`), byte for byte, and checks the handshake signature with its key.
#[derive(Debug)]
struct PinnedCert {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

/// Text of the error the client shows when the manager's certificate is not the pinned
/// one; the client matches on it to explain the failure.
pub const PIN_MISMATCH: &str = "manager certificate does not match the pinned certificate";

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(PIN_MISMATCH.into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
