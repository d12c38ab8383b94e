//! Who a peer is and what it may do, decided by Kubernetes itself (issue 21):
//! - [`agents`]: node agents present their pods' ServiceAccount tokens (`TokenReview`);
//! - [`signer`] and [`csr`]: laptops get short-lived client certificates from this
//!   manager's signer `tpvpn.dev/client`, through CertificateSigningRequests that the API
//!   server stamps with the requester's identity;
//! - [`access`]: what an identity may do, asked of the API server (`SubjectAccessReview`
//!   of the virtual resources of API group `tpvpn.dev`).

pub mod access;
pub mod agents;
pub mod csr;
pub mod signer;

pub use agents::*;
