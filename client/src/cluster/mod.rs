//! The cluster through its Kubernetes API: the kubeconfig ([`kubeconfig`]), finding the
//! manager ([`discovery`]), the laptop's client certificate ([`certificate`]), the
//! API server's port-forward ([`portforward`]) and installing the manager ([`install`]).

pub mod certificate;
pub mod discovery;
pub mod install;
pub mod kubeconfig;
pub mod portforward;
