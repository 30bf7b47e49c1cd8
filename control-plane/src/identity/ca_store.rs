//! The mesh CA in Consul KV:
//!
//! - `mesh/ca/root`: the CA mesh-control made (JSON [`StoredCa`], private
//!   key included; restrict it to mesh-control with a Consul ACL policy).
//! - `mesh/ca/bundle`: the CA certificate (PEM), for anyone to read.
//!
//! The root is created once: every replica that finds no root makes a CA
//! and writes it with check-and-set on index 0, so exactly one write wins
//! and the others read the winner's.

use consul_client::{Client, QueryOptions};
use mesh_runtime::pki::{Ca, StoredCa, TrustDomain};

use super::{CA_LIFETIME, SignError};

/// The key of the CA mesh-control made.
pub const ROOT_KEY: &str = "mesh/ca/root";
/// The key of the trust bundle (the CA certificate, PEM).
pub const BUNDLE_KEY: &str = "mesh/ca/bundle";

/// How many times a lost creation race is followed by a read.
const TRIES: usize = 3;

/// Where the CA a replica uses came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// It was already in Consul KV.
    Found,
    /// This replica created it.
    Created,
    /// Another replica created it at the same time, and won.
    LostRace,
}

/// The CA at [`ROOT_KEY`]; made and stored there if there is none. A
/// stored CA for another trust domain, or one that does not load, is an
/// error (never replaced: every certificate in the mesh chains to it).
pub async fn load_or_create(
    consul: &Client,
    trust_domain: &TrustDomain,
) -> Result<(Ca, Origin), SignError> {
    let mut origin = Origin::Found;
    for _ in 0..TRIES {
        if let Some(ca) = read(consul, trust_domain).await? {
            return Ok((ca, origin));
        }
        let ca = Ca::self_signed(trust_domain.clone(), CA_LIFETIME)
            .map_err(|e| SignError::Internal(format!("making the mesh CA: {e}")))?;
        let json = serde_json::to_vec(&ca.to_stored())
            .map_err(|e| SignError::Internal(format!("encoding the mesh CA: {e}")))?;
        let created = consul
            .kv_put(ROOT_KEY, &json, Some(0))
            .await
            .map_err(|e| unavailable("writing", ROOT_KEY, &e))?;
        if created {
            return Ok((ca, Origin::Created));
        }
        // Another replica stored its CA first: use that one.
        origin = Origin::LostRace;
    }
    Err(SignError::Unavailable(format!(
        "{ROOT_KEY}: created by another replica but not readable after {TRIES} tries"
    )))
}

/// Writes the CA's certificate at [`BUNDLE_KEY`] unless it is there already.
pub async fn publish_bundle(consul: &Client, ca: &Ca) -> Result<(), SignError> {
    let current = consul
        .kv_get(BUNDLE_KEY, QueryOptions::default())
        .await
        .map_err(|e| unavailable("reading", BUNDLE_KEY, &e))?
        .value;
    if current.is_some_and(|pair| pair.value == ca.cert_pem().as_bytes()) {
        return Ok(());
    }
    consul
        .kv_put(BUNDLE_KEY, ca.cert_pem().as_bytes(), None)
        .await
        .map_err(|e| unavailable("writing", BUNDLE_KEY, &e))?;
    tracing::info!(key = BUNDLE_KEY, "trust bundle published");
    Ok(())
}

/// The stored CA, if there is one.
async fn read(consul: &Client, trust_domain: &TrustDomain) -> Result<Option<Ca>, SignError> {
    let Some(pair) = consul
        .kv_get(ROOT_KEY, QueryOptions::default())
        .await
        .map_err(|e| unavailable("reading", ROOT_KEY, &e))?
        .value
    else {
        return Ok(None);
    };
    let stored: StoredCa = serde_json::from_slice(&pair.value)
        .map_err(|e| SignError::Internal(format!("{ROOT_KEY}: not a stored CA (JSON): {e}")))?;
    if stored.trust_domain != trust_domain.as_str() {
        return Err(SignError::Internal(format!(
            "{ROOT_KEY}: the stored CA is for trust domain {:?}, but trust_domain is {:?}",
            stored.trust_domain,
            trust_domain.as_str()
        )));
    }
    Ca::from_stored(&stored)
        .map(Some)
        .map_err(|e| SignError::Internal(format!("{ROOT_KEY}: the stored CA does not load: {e}")))
}

fn unavailable(doing: &str, key: &str, e: &consul_client::Error) -> SignError {
    SignError::Unavailable(format!("{doing} {key} in Consul KV: {e}"))
}
