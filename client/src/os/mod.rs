//! What the client changes or asks of the operating system: routes ([`routes`]), the
//! resolver (`/etc/resolv.conf`: [`osdns`]; systemd-resolved: [`resolved`]; macOS's
//! `/etc/resolver` files and route commands: [`macos`]) and the user who ran `tpvpn`
//! ([`user`]).

pub mod macos;
pub mod osdns;
pub mod resolved;
pub mod routes;
pub mod user;
