//! The cluster handshake's proofs: HMAC-SHA256 keyed by the cookie over a direction label,
//! both nonces and both names (the protocol is described in the parent module).

use super::{Nonce, Proof, CLUSTER_PROTOCOL_VERSION, NONCE_BYTES};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Which end of a link a handshake proof speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The node that opened the TCP connection; it proves first.
    Dialer,
    /// The node that accepted it; it proves only after checking the dialler's proof.
    Acceptor,
}

/// The names and nonces of one link's handshake, as both ends see them.
#[derive(Clone, Copy, Debug)]
pub struct Transcript<'a> {
    pub dialer: &'a str,
    pub dialer_nonce: &'a Nonce,
    pub acceptor: &'a str,
    pub acceptor_nonce: &'a Nonce,
}

fn handshake_mac(cookie: &str, role: Role, t: &Transcript) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(cookie.as_bytes()).expect("any key length");
    let label: &[u8] = match role {
        Role::Dialer => b"dialer",
        Role::Acceptor => b"acceptor",
    };
    // Every variable-length field is length-prefixed, so no two transcripts share an input.
    mac.update(b"shardmq cluster handshake");
    mac.update(&CLUSTER_PROTOCOL_VERSION.to_be_bytes());
    for field in [
        label,
        t.dialer_nonce.as_slice(),
        t.acceptor_nonce.as_slice(),
        t.dialer.as_bytes(),
        t.acceptor.as_bytes(),
    ] {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac
}

/// Proof that the `role` end of the link `t` knows the cookie: HMAC-SHA256 keyed by the
/// cookie over the protocol version, the direction label and the whole transcript. A proof
/// made by the dialler never verifies as the acceptor's (and back), nor on a link with another
/// nonce, so relaying a node's own proof back to it (reflection) or replaying a recorded
/// handshake fails.
pub fn handshake_proof(cookie: &str, role: Role, t: &Transcript) -> Proof {
    handshake_mac(cookie, role, t)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a peer's proof in constant time.
pub fn verify_proof(cookie: &str, role: Role, t: &Transcript, proof: &Proof) -> bool {
    handshake_mac(cookie, role, t).verify_slice(proof).is_ok()
}

/// A fresh nonce from the operating system's random source (never a generator whose state
/// could be learned from earlier nonces).
pub fn fresh_nonce() -> Result<Nonce, getrandom::Error> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::getrandom(&mut n)?;
    Ok(n)
}
