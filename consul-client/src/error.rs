//! What can go wrong with a call, sorted by what the caller should do.

/// A failed Consul call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No agent answered in time (connect refused, connect or request
    /// timeout, connection lost mid-answer). Retry later: nothing says the
    /// call was wrong.
    #[error("Consul unreachable at {addr}: {reason}")]
    Unreachable {
        /// The last address tried.
        addr: String,
        /// The transport error.
        reason: String,
    },
    /// Consul answered with a non-success status.
    #[error("Consul answered {code}: {body}")]
    Status {
        /// The HTTP status code.
        code: u16,
        /// Consul's message (its body, trimmed and capped).
        body: String,
    },
    /// Consul answered 2xx with a body we cannot read.
    #[error("cannot decode Consul's answer: {0}")]
    Decode(String),
}

/// Longest Consul message kept in [`Error::Status`].
const MAX_BODY: usize = 512;

// === impl Error ===

impl Error {
    /// Whether trying again later may succeed: the agent was unreachable or
    /// answered 5xx (no leader, RPC failure), not a refusal of the call.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { code, .. } => *code >= 500,
            Self::Decode(_) => false,
        }
    }

    /// Whether Consul refused the call itself (4xx): bad input, missing
    /// permission. Retrying the same call will not help.
    pub fn is_caller_fault(&self) -> bool {
        matches!(self, Self::Status { code, .. } if (400..500).contains(code))
    }

    /// Whether no agent could be reached (connect error or timeout).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    /// Consul's message for a [`Error::Status`], else the whole error.
    pub fn message(&self) -> String {
        match self {
            Self::Status { body, .. } => body.clone(),
            other => other.to_string(),
        }
    }

    pub(crate) fn status(code: u16, body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        let mut body = text.trim().to_owned();
        if body.len() > MAX_BODY {
            let cut = (0..=MAX_BODY)
                .rev()
                .find(|i| body.is_char_boundary(*i))
                .unwrap_or(0);
            body.truncate(cut);
            body.push('…');
        }
        Self::Status { code, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_errors_by_fault() {
        let bad = Error::status(400, b"Invalid check\n");
        assert!(bad.is_caller_fault() && !bad.is_retryable());
        assert_eq!(bad.message(), "Invalid check");
        let down = Error::status(500, b"No cluster leader");
        assert!(down.is_retryable() && !down.is_caller_fault());
        let gone = Error::Unreachable {
            addr: "http://a".into(),
            reason: "refused".into(),
        };
        assert!(gone.is_retryable() && gone.is_unreachable());
    }

    #[test]
    fn long_bodies_are_capped() {
        let e = Error::status(500, "é".repeat(1000).as_bytes());
        assert!(e.message().len() <= MAX_BODY + '…'.len_utf8());
    }
}
