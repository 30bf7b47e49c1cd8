//! The headers of the hop between proxies: [`ENDPOINT_HEADER`] names the
//! instance a request is for as `<service>/<instance id>`, [`PROTOCOL_HEADER`]
//! says which protocol the caller's route chose for it, and
//! [`REFUSED_HEADER`] marks an answer the peer proxy made itself (a
//! refusal or a failure to reach the instance) rather than the instance.
//!
//! Consul takes nearly any instance ID, so the ID is percent-encoded where it
//! holds a byte a header value cannot carry (and `%` itself); service names
//! in a routing table are DNS labels and never need it.

use std::fmt::Write as _;

use http::{HeaderName, HeaderValue};
use mesh_runtime::pki::spiffe;

use crate::table::MAX_NAME;

/// `x-mesh-endpoint: <service>/<instance id>`.
pub const ENDPOINT_HEADER: HeaderName = HeaderName::from_static("x-mesh-endpoint");

/// `x-mesh-protocol: http1 | h2`: the protocol towards the instance, as the
/// calling proxy chose it (its route may set one).
pub const PROTOCOL_HEADER: HeaderName = HeaderName::from_static("x-mesh-protocol");

/// `x-mesh-refused: <kind>` on an answer the peer proxy made itself.
pub const REFUSED_HEADER: HeaderName = HeaderName::from_static("x-mesh-refused");

/// Longest instance ID accepted, decoded (Consul's own IDs are far shorter).
pub const MAX_ID: usize = 512;

/// An instance as [`ENDPOINT_HEADER`] names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRef {
    /// The service, as the caller's table names it (lowercase).
    pub service: String,
    /// The instance ID.
    pub id: String,
}

// === impl EndpointRef ===

impl EndpointRef {
    /// The header value naming instance `id` of `service`.
    pub fn encode(service: &str, id: &str) -> HeaderValue {
        let mut value = String::with_capacity(service.len() + 1 + id.len());
        value.push_str(service);
        value.push('/');
        for b in id.bytes() {
            if b.is_ascii_graphic() && b != b'%' {
                value.push(char::from(b));
            } else {
                let _ = write!(value, "%{b:02X}");
            }
        }
        // Only visible ASCII is left: a valid header value.
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// Reads a header value; the error says what is wrong with it.
    pub fn decode(value: &HeaderValue) -> Result<Self, String> {
        let text = value
            .to_str()
            .map_err(|_| "it is not visible ASCII".to_owned())?;
        let Some((service, id)) = text.split_once('/') else {
            return Err(format!("{text:?} is not <service>/<instance id>"));
        };
        if service.is_empty() {
            return Err(format!("{text:?}: the service name is empty"));
        }
        spiffe::check_chars(service, MAX_NAME, &['-', '_'])
            .map_err(|e| format!("{text:?}: the service name {e}"))?;
        let id = percent_decode(id).map_err(|e| format!("{text:?}: {e}"))?;
        if id.is_empty() || id.len() > MAX_ID {
            return Err(format!(
                "{text:?}: the instance id must be 1 to {MAX_ID} bytes"
            ));
        }
        Ok(Self {
            service: service.to_owned(),
            id,
        })
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = [bytes.next(), bytes.next()];
        let byte = match hex {
            [Some(h), Some(l)] => std::str::from_utf8(&[h, l])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok()),
            _ => None,
        };
        out.push(byte.ok_or("a bad percent-escape in the instance id")?);
    }
    String::from_utf8(out).map_err(|_| "the instance id is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_go_as_they_are_and_odd_ones_round_trip() {
        let v = EndpointRef::encode("orders", "orders-10.0.0.5:8080");
        assert_eq!(v, "orders/orders-10.0.0.5:8080");
        for id in ["a b/c", "50%", "é-ü", "x\ty", "slash/ed"] {
            let v = EndpointRef::encode("svc", id);
            let back = EndpointRef::decode(&v).unwrap();
            assert_eq!(
                back,
                EndpointRef {
                    service: "svc".into(),
                    id: id.into()
                },
                "{v:?}"
            );
        }
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let long_service = format!("{}/x", "s".repeat(64));
        let long_id = format!("s/{}", "i".repeat(MAX_ID + 1));
        for (value, want) in [
            ("orders", "not <service>/<instance id>"),
            ("/orders-1", "service name"),
            (long_service.as_str(), "service name"),
            ("or.ders/x", "bad character '.'"),
            ("-orders/x", "must start with a letter or digit"),
            ("orders/", "instance id must be"),
            (long_id.as_str(), "instance id must be"),
            ("orders/a%2", "percent-escape"),
            ("orders/a%zz", "percent-escape"),
            ("orders/%FF", "not UTF-8"),
        ] {
            let e = EndpointRef::decode(&HeaderValue::from_str(value).unwrap()).unwrap_err();
            assert!(e.contains(want), "{value:?}: {e}");
        }
        let e = EndpointRef::decode(&HeaderValue::from_bytes(b"svc/\xff").unwrap()).unwrap_err();
        assert!(e.contains("visible ASCII"), "{e}");
    }
}
