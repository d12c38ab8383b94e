//! QUIC settings shared by the client, the agent and the manager: TLS 1.3 only, the
//! tpvpn ALPN, a verifier that pins the manager's exact certificate, transport windows
//! sized for what a connection carries ([`Class`]), and UDP sockets with large kernel
//! buffers.

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

/// Per-stream receive window of a [`Class::Intercepts`] connection: ~2 Gbit/s per stream
/// at 1 ms, in the cluster's own network (128 KiB cost the lab's intercept bench a fifth
/// of its stream rate; 512 KiB measured as the tunnel's 8 MiB did); ~5 MiB/s at 50 ms, over
/// a developer's network to the laptop, about a home uplink.
pub const INTERCEPT_STREAM_WINDOW: u32 = 256 << 10;
/// Streams a [`Class::Intercepts`] peer may have open at once; its connection windows
/// cover all of them at once ([`INTERCEPT_STREAMS`] × [`INTERCEPT_STREAM_WINDOW`],
/// 256 MiB of credit, memory only while streams are stalled: half the agent's limit).
pub const INTERCEPT_STREAMS: u32 = 1024;
/// First bytes of the initial destination connection ID a peer picks to ask for
/// [`Class::Intercepts`]. A peer gains nothing by picking it: only smaller windows.
pub const INTERCEPT_CID_PREFIX: [u8; 4] = *b"tpvi";

/// What a connection to the manager carries, which sizes its flow-control windows. The
/// peer picks it with its initial destination connection ID, the one thing the server
/// sees before it must send its transport parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A laptop's tunnel: flows to anywhere over any distance (large per-stream windows,
    /// one connection window shared by all).
    Tunnel,
    /// A node agent's, and a laptop's intercepts connection: intercepted connections only,
    /// each its own stream. Their peers (a cluster caller, a laptop) may stop reading at
    /// any time, so no set of stalled
    /// streams may use up the connection: small per-stream windows, and connection windows
    /// (receive and send) that cover every stream it may have at once.
    Intercepts,
}

impl Class {
    /// The class a peer asked for with `orig_dst_cid`.
    pub fn of(orig_dst_cid: &[u8]) -> Class {
        if orig_dst_cid.starts_with(&INTERCEPT_CID_PREFIX) {
            Class::Intercepts
        } else {
            Class::Tunnel
        }
    }

    /// (streams granted at first, at most, connection receive window).
    fn limits(self) -> (u32, u32, u32) {
        match self {
            Class::Tunnel => (INITIAL_STREAMS, MAX_CONCURRENT_STREAMS, CONNECTION_WINDOW),
            Class::Intercepts => (INTERCEPT_STREAMS, INTERCEPT_STREAMS, INTERCEPT_STREAMS * INTERCEPT_STREAM_WINDOW),
        }
    }

    /// The transport parameters of the class, once authenticated.
    pub fn transport(self) -> TransportConfig {
        let mut t = transport_config();
        if self == Class::Intercepts {
            let (streams, _, window) = self.limits();
            t.max_concurrent_bidi_streams(VarInt::from_u32(streams))
                .stream_receive_window(VarInt::from_u32(INTERCEPT_STREAM_WINDOW))
                .receive_window(VarInt::from_u32(window))
                .send_window(u64::from(window));
        }
        t
    }
}

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

/// The server's transport parameters: those of `class`, except that a new connection
/// may open only [`PREAUTH_STREAMS`] stream and send [`PREAUTH_WINDOW`] bytes until
/// [`grant_full_limits`] is called for it.
fn server_transport_config(class: Class) -> TransportConfig {
    let mut t = class.transport();
    t.max_concurrent_bidi_streams(VarInt::from_u32(PREAUTH_STREAMS)).receive_window(VarInt::from_u32(PREAUTH_WINDOW));
    t
}

/// Raises an authenticated connection's limits to those of its `class`.
pub fn grant_full_limits(conn: &quinn::Connection, class: Class) -> StreamGrant {
    let (granted, max, window) = class.limits();
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(granted));
    conn.set_receive_window(VarInt::from_u32(window));
    StreamGrant { granted, max }
}

/// How many concurrent streams the peer may open: doubled (up to the class's maximum)
/// whenever it has half of them open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamGrant {
    granted: u32,
    max: u32,
}

impl StreamGrant {
    /// The peer has `open` streams open: widen the grant if that is half of it.
    pub fn in_use(&mut self, conn: &quinn::Connection, open: usize) {
        if open.saturating_mul(2) >= self.granted as usize && self.granted < self.max {
            self.granted = (self.granted * 2).min(self.max);
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
    server_config_with(certs, key, None)
}

/// [`server_config`] that also takes client certificates issued by `clients`' CA.
pub fn server_config_with(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    clients: Option<Arc<ClientCas>>,
) -> Result<quinn::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Stream(e.to_string()))?;
    let builder = match clients {
        Some(c) => builder.with_client_cert_verifier(c),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(certs, key)
        .map_err(|e| Error::Stream(format!("certificate and key do not fit together: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| Error::Stream(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // A laptop whose address changes (a new Wi-Fi) keeps its connection: the client's
    // new path is validated and taken (QUIC connection migration; quinn's default, said
    // here because the sessions test depends on it).
    cfg.migration(true);
    cfg.transport_config(Arc::new(server_transport_config(Class::Tunnel)))
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// `server`'s TLS and limits with the transport parameters of `class`; with
/// `over_stream`, for a stream carrier ([`crate::stream`]: packets of
/// [`crate::stream::STREAM_MTU`] bytes).
pub fn server_config_for(server: &quinn::ServerConfig, class: Class, over_stream: bool) -> quinn::ServerConfig {
    let mut t = server_transport_config(class);
    if over_stream {
        crate::stream::tune_transport(&mut t);
    }
    let mut cfg = server.clone();
    cfg.transport_config(Arc::new(t));
    cfg
}

/// Client-side QUIC configuration that accepts exactly the certificate `pinned`; with
/// `over_stream`, for a stream carrier ([`crate::stream`]).
pub fn client_config(pinned: CertificateDer<'static>, over_stream: bool) -> Result<quinn::ClientConfig> {
    client_config_for(pinned, over_stream, Class::Tunnel, None)
}

/// A client certificate (with the chain to its CA) and its key.
#[derive(Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// [`client_config`] for a connection of `class`: its transport parameters, and for
/// [`Class::Intercepts`] an initial destination connection ID that asks the manager for
/// it; presenting `cert` if given.
pub fn client_config_for(
    pinned: CertificateDer<'static>,
    over_stream: bool,
    class: Class,
    cert: Option<&ClientCert>,
) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = PinnedCert { cert: pinned, provider: provider.clone() };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Stream(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut tls = match cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .map_err(|e| Error::Stream(format!("the client certificate and key do not fit together: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| Error::Stream(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = class.transport();
    if class == Class::Tunnel {
        // The manager opens a stream per intercepted connection toward a client: a laptop
        // allows all of them (the per-stream memory is the laptop's own, for one connection).
        t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS));
    } else {
        let random = provider.secure_random;
        cfg.initial_dst_cid_provider(Arc::new(move || {
            let mut cid = [0u8; 20];
            cid[..4].copy_from_slice(&INTERCEPT_CID_PREFIX);
            // A failing system RNG leaves zeros: the ID stays valid (and is still unique
            // enough to route on, with the endpoint's own IDs after the handshake).
            let _ = random.fill(&mut cid[4..]);
            quinn::ConnectionId::new(&cid)
        }));
    }
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

/// Whether a connection failed because the manager's certificate is not the pinned one:
/// the pinning verifier fails as an application's verification
/// (`ApplicationVerificationFailure`), which TLS sends as alert `access_denied`, and
/// nothing else on the client's side of the handshake does.
pub fn is_pin_mismatch(e: &quinn::ConnectionError) -> bool {
    let access_denied = quinn::TransportErrorCode::crypto(u8::from(rustls::AlertDescription::AccessDenied));
    match e {
        quinn::ConnectionError::TransportError(t) => t.code == access_denied,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code == access_denied,
        _ => false,
    }
}

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
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
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
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 handshake signature checked with the provider's algorithms (both verifiers).
fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &provider.signature_verification_algorithms)
}

/// The CA whose client certificates a server accepts, settable after the server started
/// (the manager reads its client CA from the cluster). A client may present no
/// certificate at all (agents, token clients: they authenticate in the hello); one it
/// presents must chain to the CA, be valid now and be for client authentication, or the
/// handshake fails before any stream. Until a CA is set every presented certificate fails.
#[derive(Debug)]
pub struct ClientCas {
    verifier: std::sync::RwLock<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>>,
    provider: Arc<CryptoProvider>,
}

impl Default for ClientCas {
    fn default() -> ClientCas {
        ClientCas { verifier: Default::default(), provider: provider() }
    }
}

impl ClientCas {
    /// Trusts the CA certificate(s) of `pem` (replacing any before).
    pub fn set(&self, pem: &[u8]) -> Result<()> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Stream(format!("the client CA: {e}")))?;
            roots.add(cert).map_err(|e| Error::Stream(format!("the client CA: {e}")))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Stream(format!("the client CA: {e}")))?;
        *self.verifier.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(verifier);
        Ok(())
    }

    /// Whether `der` is a client certificate of the CA, valid now (what the handshake
    /// checks; for a certificate presented later, a renewal).
    pub fn verify(&self, der: &[u8]) -> std::result::Result<(), String> {
        use rustls::server::danger::ClientCertVerifier;
        self.verify_client_cert(&CertificateDer::from(der), &[], UnixTime::now()).map(drop).map_err(|e| e.to_string())
    }
}

impl rustls::server::danger::ClientCertVerifier for ClientCas {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verifier = self.verifier.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match verifier {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General("this manager issues no client certificates yet".into())),
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
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The exporter label of the keying material a certificate renewal is bound to.
pub const RENEW_LABEL: &[u8] = b"EXPORTER-tpvpn-certificate-renewal";

/// What a renewal's proof signs: keying material exported from `conn`'s TLS session (the
/// same at both ends of this connection and known to no one else), bound to the new
/// certificate `cert_der`: a proof made for one connection or certificate is worth
/// nothing for another.
pub fn renewal_binding(conn: &quinn::Connection, cert_der: &[u8]) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, RENEW_LABEL, cert_der)
        .map_err(|_| Error::Stream("cannot export keying material from the TLS session".into()))?;
    Ok(out)
}

/// `key`'s signature over `message` (ECDSA P-256 with SHA-256: the keys `tpvpn up` makes).
pub fn sign(key: &PrivateKeyDer<'_>, message: &[u8]) -> Result<Vec<u8>> {
    let key = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| Error::Stream(format!("the key: {e}")))?;
    let signer = key
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or_else(|| Error::Stream("the key cannot sign with ECDSA P-256".into()))?;
    signer.sign(message).map_err(|e| Error::Stream(format!("signing: {e}")))
}

/// Whether `signature` over `message` verifies with `public_key` (a certificate's
/// `subjectPublicKey`; ECDSA P-256 with SHA-256).
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    provider()
        .signature_verification_algorithms
        .mapping
        .iter()
        .filter(|(scheme, _)| *scheme == SignatureScheme::ECDSA_NISTP256_SHA256)
        .flat_map(|(_, algorithms)| algorithms.iter())
        .any(|a| a.verify_signature(public_key, message, signature).is_ok())
}

/// The certificate a client presented and the server verified, if any.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_class_is_asked_for_with_the_first_connection_id() {
        assert_eq!(Class::of(b"tpvi0123456789abcdef"), Class::Intercepts);
        assert_eq!(Class::of(b"\x01tpvi"), Class::Tunnel);
        assert_eq!(Class::of(b""), Class::Tunnel);
        let (streams, _, window) = Class::Intercepts.limits();
        assert_eq!(u64::from(window), u64::from(streams) * u64::from(INTERCEPT_STREAM_WINDOW), "every stream at once");
    }

    /// A CA and a client certificate it issued (with its key).
    fn issued_by_a_ca() -> (String, ClientCert) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (ca_cert.pem(), ClientCert { chain: vec![cert.der().clone()], key })
    }

    /// Connects with `cert` to a server trusting `cas`: the certificate the server saw,
    /// or the handshake's failure.
    async fn present(cas: Arc<ClientCas>, cert: Option<&ClientCert>) -> std::result::Result<Option<Vec<u8>>, String> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server = server_config_with(vec![ck.cert.der().clone()], key, Some(cas)).unwrap();
        let server = endpoint(([127, 0, 0, 1], 0).into(), Some(server)).unwrap();
        let addr = server.local_addr().unwrap();
        let client = endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
        let cfg = client_config_for(ck.cert.der().clone(), false, Class::Tunnel, cert).unwrap();
        let decided = tokio::sync::Notify::new();
        let accept = async {
            let conn = server.accept().await.unwrap().await.map_err(|e| e.to_string());
            decided.notify_one();
            Ok(peer_certificate(&conn?).map(|c| c.to_vec()))
        };
        let connect = async {
            let conn = client.connect_with(cfg, addr, SERVER_NAME).unwrap().await;
            // The client's side stays open until the server has decided.
            decided.notified().await;
            conn.map(drop).map_err(|e| e.to_string())
        };
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(accept, connect) })
            .await
            .expect("the handshake ends in time");
        accepted
    }

    #[tokio::test]
    async fn a_client_certificate_counts_only_from_the_trusted_ca() {
        let (ca, alice) = issued_by_a_ca();
        let (_, forged) = issued_by_a_ca();
        let cas = Arc::new(ClientCas::default());
        // No CA yet: no certificate is believed; none presented is fine.
        assert!(present(cas.clone(), Some(&alice)).await.is_err());
        assert_eq!(present(cas.clone(), None).await, Ok(None));
        cas.set(ca.as_bytes()).unwrap();
        assert_eq!(present(cas.clone(), Some(&alice)).await, Ok(Some(alice.chain[0].to_vec())));
        assert!(present(cas.clone(), Some(&forged)).await.is_err(), "a certificate of another CA");
        assert_eq!(present(cas.clone(), None).await, Ok(None), "a token client (or an agent)");
        assert!(cas.set(b"").is_err(), "no CA in it");
    }

    #[tokio::test]
    async fn a_renewal_proof_holds_only_for_its_key_connection_and_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let other = rcgen::KeyPair::generate().unwrap();
        // Both ends of a connection export the same binding; another connection another.
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).unwrap();
        let server_key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server =
            endpoint(([127, 0, 0, 1], 0).into(), Some(server_config(vec![ck.cert.der().clone()], server_key).unwrap()))
                .unwrap();
        let addr = server.local_addr().unwrap();
        let client = endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
        let pair = || async {
            let cfg = client_config(ck.cert.der().clone(), false).unwrap();
            let (c, s) =
                tokio::join!(async { client.connect_with(cfg, addr, SERVER_NAME).unwrap().await.unwrap() }, async {
                    server.accept().await.unwrap().await.unwrap()
                });
            (c, s)
        };
        let (c1, s1) = pair().await;
        let (c2, _s2) = pair().await;
        let binding = renewal_binding(&c1, b"certificate").unwrap();
        assert_eq!(binding, renewal_binding(&s1, b"certificate").unwrap(), "the same at both ends");
        assert_ne!(binding, renewal_binding(&c2, b"certificate").unwrap(), "another connection");
        assert_ne!(binding, renewal_binding(&c1, b"another certificate").unwrap(), "another certificate");
        let proof = sign(&der, &binding).unwrap();
        assert!(verify(key.public_key_raw(), &binding, &proof));
        assert!(!verify(other.public_key_raw(), &binding, &proof), "another key");
        assert!(!verify(key.public_key_raw(), &renewal_binding(&c2, b"certificate").unwrap(), &proof), "replayed");
        assert!(!verify(key.public_key_raw(), &binding, b"garbage"));
    }

    /// 80 streams with 1 MiB sent on each that the server never reads, then one more
    /// stream: whether its 64 KiB reach the server.
    async fn room_left_beside_stalled_streams(class: Class) -> bool {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server = server_config_for(&server_config(vec![ck.cert.der().clone()], key).unwrap(), class, false);
        let server = endpoint(([127, 0, 0, 1], 0).into(), Some(server)).unwrap();
        let addr = server.local_addr().unwrap();
        let client = endpoint(([127, 0, 0, 1], 0).into(), None).unwrap();
        let cfg = client_config_for(ck.cert.der().clone(), false, class, None).unwrap();
        let (conn, accepted) =
            tokio::join!(async { client.connect_with(cfg, addr, SERVER_NAME).unwrap().await.unwrap() }, async {
                let incoming = server.accept().await.unwrap();
                assert_eq!(Class::of(&incoming.orig_dst_cid()), class, "the client asked for its class");
                incoming.await.unwrap()
            });
        let _grant = grant_full_limits(&accepted, class);
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (_, mut recv) = accepted.accept_bi().await.unwrap();
                if held.len() == 80 {
                    // The last stream: read it to its end.
                    return recv.read_to_end(1 << 20).await.map(|d| d.len()).unwrap_or(0);
                }
                held.push(recv);
            }
        });
        let mut writers = Vec::new();
        for _ in 0..80 {
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(b"x").await.unwrap();
            writers.push(tokio::spawn(async move {
                let _keep = _recv;
                let _ = send.write_all(&vec![0u8; 1 << 20]).await;
                std::future::pending::<()>().await
            }));
        }
        // Let the stalled streams take what they can.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let last = async {
            send.write_all(&[7u8; 64 << 10]).await.unwrap();
            send.finish().unwrap();
            held.await.unwrap()
        };
        let got = tokio::time::timeout(Duration::from_secs(5), last).await;
        writers.iter().for_each(tokio::task::JoinHandle::abort);
        got == Ok(64 << 10)
    }

    #[tokio::test]
    async fn stalled_streams_leave_room_on_an_intercepts_connection_only() {
        assert!(room_left_beside_stalled_streams(Class::Intercepts).await, "intercepts");
        // Against a tunnel's windows, the same stalled streams take the whole connection.
        assert!(!room_left_beside_stalled_streams(Class::Tunnel).await, "tunnel");
    }
}
