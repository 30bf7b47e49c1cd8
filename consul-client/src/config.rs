//! What a [`Client`](crate::Client) is built from, and the rustls setup
//! that goes with it.
//!
//! TLS is always configured by us (never by reqwest's defaults) with ring
//! as an explicit provider, so a client works whether or not the process
//! installed a default crypto provider, and it trusts exactly the CA file
//! it was given.

use std::{fmt, path::PathBuf, sync::Arc};

use reqwest::Url;
use rustls::{ClientConfig as TlsConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Where Consul is and how to talk to it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientConfig {
    /// Agent addresses (`http://127.0.0.1:8500`, `https://10.0.0.5:8501`),
    /// tried in order: a connect error moves on to the next one.
    pub addrs: Vec<String>,
    /// ACL token sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// TLS to Consul; needed for `https://` addresses.
    pub tls: Option<TlsFiles>,
}

/// PEM files for TLS to Consul.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the agents' certificates: the only trusted root.
    pub ca: PathBuf,
    /// Client certificate (chain), for agents with `verify_incoming`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key.
    pub key: Option<PathBuf>,
}

/// Why a client could not be built. Its `Display` names the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No agent address was given.
    #[error("no Consul address given")]
    NoAddress,
    /// An address is not an `http://` or `https://` URL.
    #[error("Consul address {addr:?}: {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS file could not be read or used.
    #[error("Consul TLS: {0}")]
    Tls(String),
    /// The HTTP client could not be built.
    #[error("Consul HTTP client: {0}")]
    Http(String),
}

// === impl ClientConfig ===

impl fmt::Debug for ClientConfig {
    // The token is a secret: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("addrs", &self.addrs)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl ClientConfig {
    /// A config for the given addresses, without token or TLS.
    pub fn new<S: Into<String>>(addrs: impl IntoIterator<Item = S>) -> Self {
        Self {
            addrs: addrs.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// The same config narrowed to its first address: the local agent,
    /// which agent-scoped calls (service registration) must reach.
    pub fn first_only(&self) -> Self {
        Self {
            addrs: self.addrs.iter().take(1).cloned().collect(),
            ..self.clone()
        }
    }

    /// Parses and checks every address; an `https://` one needs [`TlsFiles`].
    pub fn urls(&self) -> Result<Vec<Url>, ConfigError> {
        if self.addrs.is_empty() {
            return Err(ConfigError::NoAddress);
        }
        self.addrs
            .iter()
            .map(|a| parse_addr(a, self.tls.is_some()))
            .collect()
    }
}

/// The local agent's HTTP address, the default of every binary.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:8500";

/// The Consul settings every Meshwork binary takes, as its config file,
/// flags and environment give them (`consul_addr`, repeatable, default
/// [`DEFAULT_ADDR`]; `consul_token`; `consul_ca_file`, `consul_cert_file`,
/// `consul_key_file`), checked the way start-up needs: every address
/// parses, the TLS files go together and can be read. The error is one
/// line naming the setting.
pub fn from_settings(
    addrs: &[String],
    token: Option<&str>,
    ca_file: Option<&std::path::Path>,
    cert_file: Option<&std::path::Path>,
    key_file: Option<&std::path::Path>,
) -> Result<ClientConfig, String> {
    if cert_file.is_some() != key_file.is_some() {
        return Err("consul_cert_file and consul_key_file go together".into());
    }
    let tls = match ca_file {
        Some(ca) => Some(TlsFiles {
            ca: ca.to_owned(),
            cert: cert_file.map(ToOwned::to_owned),
            key: key_file.map(ToOwned::to_owned),
        }),
        None if cert_file.is_some() => {
            return Err("consul_cert_file needs consul_ca_file".into());
        }
        None => None,
    };
    let mut addrs: Vec<String> = addrs
        .iter()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    if addrs.is_empty() {
        addrs.push(DEFAULT_ADDR.into());
    }
    for addr in &addrs {
        parse_addr(addr, tls.is_some()).map_err(|e| format!("consul_addr: {e}"))?;
    }
    let config = ClientConfig {
        addrs,
        token: token.filter(|t| !t.is_empty()).map(ToOwned::to_owned),
        tls,
    };
    // Reads the TLS files now, so that a bad one stops start-up.
    crate::Client::new(&config).map_err(|e| format!("consul: {e}"))?;
    Ok(config)
}

/// Parses one agent address; `https` requires `has_tls`.
pub fn parse_addr(addr: &str, has_tls: bool) -> Result<Url, ConfigError> {
    let bad = |reason: &str| ConfigError::BadAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let url = Url::parse(addr).map_err(|e| bad(&e.to_string()))?;
    match url.scheme() {
        "http" => {}
        "https" if has_tls => {}
        "https" => return Err(bad("https needs a CA file")),
        _ => return Err(bad("expected http:// or https://")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("no query or fragment allowed"));
    }
    Ok(url)
}

/// The rustls client config: the CA file as the only root, and the client
/// certificate when one is given. Without [`TlsFiles`] it trusts nothing,
/// which is fine: then only `http://` addresses are accepted.
pub(crate) fn rustls_config(tls: Option<&TlsFiles>) -> Result<TlsConfig, ConfigError> {
    let err = |e: &dyn fmt::Display| ConfigError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = TlsConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?;
    let mut roots = RootCertStore::empty();
    let Some(tls) = tls else {
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    };
    for cert in read_certs(&tls.ca)? {
        roots.add(cert).map_err(|e| err(&e))?;
    }
    let builder = builder.with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| err(&format_args!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(read_certs(cert)?, key)
                .map_err(|e| err(&e))
        }
        _ => Err(ConfigError::Tls(
            "a client certificate and its key go together".into(),
        )),
    }
}

fn read_certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let err = |e: &dyn fmt::Display| ConfigError::Tls(format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    if certs.is_empty() {
        return Err(err(&"no certificate in file"));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert!(parse_addr("http://127.0.0.1:8500", false).is_ok());
        assert!(parse_addr("https://consul:8501", true).is_ok());
        let e = parse_addr("https://consul:8501", false).unwrap_err();
        assert!(e.to_string().contains("CA file"), "{e}");
        assert!(parse_addr("127.0.0.1:8500", false).is_err());
        assert!(parse_addr("ftp://x", false).is_err());
        assert!(matches!(
            ClientConfig::default().urls(),
            Err(ConfigError::NoAddress)
        ));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let mut c = ClientConfig::new(["http://a"]);
        c.token = Some("s3cr3t".into());
        let text = format!("{c:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn first_only_keeps_the_local_agent() {
        let c = ClientConfig::new(["http://a", "http://b"]);
        assert_eq!(c.first_only().addrs, vec!["http://a"]);
    }

    #[test]
    fn missing_ca_file_is_named() {
        let tls = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: None,
            key: None,
        };
        let e = rustls_config(Some(&tls)).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
