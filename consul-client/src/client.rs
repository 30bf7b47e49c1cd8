//! [`Client`]: one HTTP client for a list of agent addresses.
//!
//! Every call goes to the address that answered last. A connect error
//! (refused, connect timeout) moves the same call on to the next address;
//! once one answers, it becomes the current one. Any other transport
//! failure (a request timeout, a connection lost mid-answer) ends the call
//! as [`Error::Unreachable`] and moves the current address on, so that a
//! hung agent is not asked again first.
//!
//! The typed calls live in the submodules, one per part of Consul's API.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use reqwest::{
    Method, StatusCode, Url,
    header::{HeaderMap, HeaderValue},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    config::{ClientConfig, ConfigError, rustls_config},
    error::Error,
    query::{QueryOptions, QueryResult, SHORT_TIMEOUT},
};

mod agent;
mod health;
mod kv;

/// How long a TCP (+TLS) connect may take before the next address is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A Consul HTTP client. Cheap to clone; clones share connections and the
/// current address.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    addrs: Arc<[Url]>,
    current: Arc<AtomicUsize>,
    token: Option<HeaderValue>,
}

/// One call to make: path under `/v1/`, query, body, timeout.
#[derive(Debug)]
pub(crate) struct Request {
    method: Method,
    path: Vec<String>,
    params: Vec<(&'static str, Option<String>)>,
    body: Option<Vec<u8>>,
    timeout: Duration,
}

/// Consul's answer, before decoding.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

// === impl Client ===

impl Client {
    /// Builds a client; checks the addresses, token and TLS files.
    pub fn new(config: &ClientConfig) -> Result<Self, ConfigError> {
        let addrs = config.urls()?;
        let token = config
            .token
            .as_deref()
            .map(|t| {
                let mut value = HeaderValue::from_str(t).map_err(|_| {
                    ConfigError::Http("the ACL token has invalid characters".into())
                })?;
                value.set_sensitive(true);
                Ok::<_, ConfigError>(value)
            })
            .transpose()?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(rustls_config(config.tls.as_ref())?)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| ConfigError::Http(e.to_string()))?;
        Ok(Self {
            http,
            addrs: addrs.into(),
            current: Arc::new(AtomicUsize::new(0)),
            token,
        })
    }

    /// The address calls go to first (the last one that answered).
    pub fn current_addr(&self) -> &Url {
        &self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()]
    }

    /// Sends `req` and decodes a 2xx JSON answer with its metadata.
    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        req: Request,
    ) -> Result<QueryResult<T>, Error> {
        let answer = self.send(&req).await?.success()?;
        answer.decode()
    }

    /// Sends `req`; a 2xx answer is returned, anything else is an error.
    pub(crate) async fn send_ok(&self, req: Request) -> Result<Answer, Error> {
        self.send(&req).await?.success()
    }

    /// Sends `req` to the current address, failing over on connect errors.
    pub(crate) async fn send(&self, req: &Request) -> Result<Answer, Error> {
        let n = self.addrs.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for step in 0..n {
            let i = (start + step) % n;
            match self.send_to(&self.addrs[i], req).await {
                Ok(answer) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(e) if e.is_connect() => {
                    tracing::debug!(addr = %self.addrs[i], error = %e, "Consul connect failed; trying the next address");
                    last = Some((i, e));
                }
                Err(e) => {
                    let _ = self.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    return Err(unreachable(&self.addrs[i], &e));
                }
            }
        }
        let (i, e) = last.expect("the loop ran at least once: a client has an address");
        Err(unreachable(&self.addrs[i], &e))
    }

    async fn send_to(&self, base: &Url, req: &Request) -> Result<Answer, reqwest::Error> {
        let mut builder = self
            .http
            .request(req.method.clone(), req.url(base))
            .timeout(req.timeout);
        if let Some(token) = &self.token {
            builder = builder.header("x-consul-token", token.clone());
        }
        if let Some(body) = &req.body {
            builder = builder.body(body.clone());
        }
        let resp = builder.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?.to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

fn unreachable(addr: &Url, e: &reqwest::Error) -> Error {
    // reqwest's Display is terse ("error sending request"); the cause says why.
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    Error::Unreachable {
        addr: addr.to_string(),
        reason,
    }
}

// === impl Request ===

impl Request {
    /// A call of `method` on `/v1/<segments...>`, with the short timeout.
    pub(crate) fn new<S: AsRef<str>>(method: Method, segments: &[S]) -> Self {
        Self {
            method,
            path: segments.iter().map(|s| s.as_ref().to_owned()).collect(),
            params: Vec::new(),
            body: None,
            timeout: SHORT_TIMEOUT,
        }
    }

    /// Adds `?key=value`.
    pub(crate) fn param(mut self, key: &'static str, value: impl ToString) -> Self {
        self.params.push((key, Some(value.to_string())));
        self
    }

    /// Adds `?key` without a value (`?passing`).
    pub(crate) fn flag(mut self, key: &'static str) -> Self {
        self.params.push((key, None));
        self
    }

    /// Applies blocking-query options and their timeout.
    pub(crate) fn query(mut self, opts: &QueryOptions) -> Self {
        self.params.extend(opts.params());
        self.timeout = opts.timeout();
        self
    }

    /// Sets a JSON body.
    pub(crate) fn json<T: Serialize>(self, body: &T) -> Result<Self, Error> {
        let bytes = serde_json::to_vec(body).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(self.bytes(bytes))
    }

    /// Sets a raw body.
    pub(crate) fn bytes(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }

    fn url(&self, base: &Url) -> Url {
        let mut url = base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push("v1").extend(&self.path);
        }
        if !self.params.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in &self.params {
                match value {
                    Some(v) => pairs.append_pair(key, v),
                    None => pairs.append_key_only(key),
                };
            }
        }
        url
    }
}

// === impl Answer ===

impl Answer {
    /// The answer if 2xx, else [`Error::Status`] with Consul's message.
    pub(crate) fn success(self) -> Result<Self, Error> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(Error::status(self.status.as_u16(), &self.body))
        }
    }

    /// Decodes the JSON body with the metadata headers.
    pub(crate) fn decode<T: DeserializeOwned>(&self) -> Result<QueryResult<T>, Error> {
        let value = serde_json::from_slice(&self.body).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(QueryResult::from_headers(value, &self.headers))
    }
}

#[cfg(test)]
mod tests;
