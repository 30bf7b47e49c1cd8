//! `RouteUpdate` messages put together from shared, already encoded
//! pieces, byte for byte what prost would encode for the same message.
//!
//! A service's endpoints are encoded once per change, as the record a
//! `Snapshot` or a `Delta` carries it in (both list services as field 1),
//! and every stream's message refers to that piece instead of encoding
//! the service again. A snapshot of every service is one piece shared by
//! every stream that sends it at the same point of the change log. A
//! node's config is one piece too (see [`crate::watch::NodeConfigEntry`]),
//! shared by every stream of that node.

use bytes::{BufMut, Bytes, BytesMut};
use mesh_proto::v1::{Delta, Endpoint, RouteUpdate, ServiceEndpoints, Snapshot};
use prost::Message;

/// The gRPC message prefix: a compressed flag and a 4-byte length.
const GRPC_PREFIX: usize = 5;

/// `RouteUpdate` field keys (tag << 3 | wire type).
const SNAPSHOT_KEY: u8 = 2 << 3 | 2;
const DELTA_KEY: u8 = 3 << 3 | 2;
const STALE_TRUE: [u8; 2] = [4 << 3, 1];

/// Deltas up to this size leave as one buffer; a larger body (a snapshot)
/// is sent as it is, after its own small header.
const COPY_BELOW: usize = 16 * 1024;

/// One service as a snapshot or a delta lists it: field 1, length
/// delimited, holding a `ServiceEndpoints`.
pub(crate) fn service_piece(name: &str, endpoints: &[Endpoint]) -> Bytes {
    let record = Snapshot {
        services: vec![ServiceEndpoints {
            name: name.to_owned(),
            endpoints: endpoints.to_vec(),
        }],
    };
    record.encode_to_vec().into()
}

/// A snapshot's body: the pieces of its services, in name order.
pub(crate) fn concat<'a>(pieces: impl IntoIterator<Item = &'a Bytes>) -> Bytes {
    let pieces: Vec<&Bytes> = pieces.into_iter().collect();
    let mut body = BytesMut::with_capacity(pieces.iter().map(|p| p.len()).sum());
    for piece in pieces {
        body.put_slice(piece);
    }
    body.freeze()
}

/// A delta's body: the pieces of the changed services, then the names of
/// those gone.
pub(crate) fn delta_body(upserted: &[Bytes], removed: &[String]) -> Bytes {
    let removed = Delta {
        upserted: Vec::new(),
        removed: removed.to_vec(),
    }
    .encode_to_vec();
    concat(
        upserted
            .iter()
            .chain(std::iter::once(&Bytes::from(removed))),
    )
}

/// The chunks of one gRPC message holding a `RouteUpdate`: `snapshot`
/// tells whether `body` is a `Snapshot` or a `Delta`; `config` is the
/// encoded `config` field, when the message carries one.
pub(crate) fn frame(
    version: u64,
    snapshot: bool,
    body: Bytes,
    stale: bool,
    config: Option<&Bytes>,
) -> Vec<Bytes> {
    let version_field = RouteUpdate {
        version,
        ..RouteUpdate::default()
    }
    .encode_to_vec();
    let key = if snapshot { SNAPSHOT_KEY } else { DELTA_KEY };
    let kind_len = 1 + prost::length_delimiter_len(body.len()) + body.len();
    let stale_field: &[u8] = if stale { &STALE_TRUE } else { &[] };
    let config_len = config.map_or(0, Bytes::len);
    let len = version_field.len() + kind_len + stale_field.len() + config_len;
    // A catalog would need millions of services to come near 4 GiB; no
    // gRPC peer takes such a message anyway.
    let len32 = u32::try_from(len).expect("a route update is under 4 GiB");

    let whole = body.len() + config_len < COPY_BELOW;
    let head_len = GRPC_PREFIX + len - if whole { 0 } else { body.len() + config_len };
    let mut head = BytesMut::with_capacity(head_len);
    head.put_u8(0);
    head.put_u32(len32);
    head.put_slice(&version_field);
    head.put_u8(key);
    prost::encode_length_delimiter(body.len(), &mut head)
        .expect("a BytesMut grows to take a varint");
    if whole {
        head.put_slice(&body);
        head.put_slice(stale_field);
        if let Some(config) = config {
            head.put_slice(config);
        }
        return vec![head.freeze()];
    }
    let mut chunks = vec![head.freeze(), body];
    if stale {
        chunks.push(Bytes::from_static(&STALE_TRUE));
    }
    chunks.extend(config.cloned());
    chunks
}

#[cfg(test)]
pub(crate) mod tests {
    use mesh_proto::v1::route_update::Kind;

    use super::*;

    /// The `RouteUpdate` a list of chunks holds, checking the gRPC prefix.
    pub(crate) fn decode(chunks: &[Bytes]) -> RouteUpdate {
        let all = concat(chunks);
        assert_eq!(all[0], 0, "not compressed");
        let len = u32::from_be_bytes(all[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, all.len() - GRPC_PREFIX, "the prefix holds the length");
        RouteUpdate::decode(&all[GRPC_PREFIX..]).unwrap()
    }

    fn ep(id: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 8080,
            node: "n1".into(),
            tags: vec!["v2".into()],
            meta: [("zone".to_owned(), "a".to_owned())].into(),
        }
    }

    fn service(name: &str, ids: &[&str]) -> ServiceEndpoints {
        ServiceEndpoints {
            name: name.into(),
            endpoints: ids.iter().map(|i| ep(i)).collect(),
        }
    }

    fn piece(s: &ServiceEndpoints) -> Bytes {
        service_piece(&s.name, &s.endpoints)
    }

    fn prost_framed(update: &RouteUpdate) -> Bytes {
        let body = update.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out.into()
    }

    #[test]
    fn a_snapshot_is_what_prost_encodes() {
        for stale in [false, true] {
            let services = vec![service("api", &[]), service("web", &["a", "b"])];
            let body = concat(&services.iter().map(piece).collect::<Vec<_>>());
            let chunks = frame(7, true, body, stale, None);
            let expected = RouteUpdate {
                version: 7,
                kind: Some(Kind::Snapshot(Snapshot { services })),
                stale,
                config: None,
                intentions: None,
            };
            assert_eq!(concat(&chunks), prost_framed(&expected));
        }
    }

    #[test]
    fn a_delta_is_what_prost_encodes() {
        let upserted = vec![service("web", &["a"])];
        let removed = vec!["gone".to_owned(), "old".to_owned()];
        let body = delta_body(&upserted.iter().map(piece).collect::<Vec<_>>(), &removed);
        let chunks = frame(300, false, body, false, None);
        assert_eq!(chunks.len(), 1, "a small delta is one buffer");
        let expected = RouteUpdate {
            version: 300,
            kind: Some(Kind::Delta(Delta { upserted, removed })),
            stale: false,
            config: None,
            intentions: None,
        };
        assert_eq!(concat(&chunks), prost_framed(&expected));
    }

    #[test]
    fn a_config_rides_along_as_prost_encodes_it() {
        let entry = crate::watch::NodeConfigEntry::new(4, "[routes.web]\nretries = 1\n".into());
        for (snapshot, stale, services) in [(true, true, 2), (false, false, 0), (true, false, 600)]
        {
            let services: Vec<_> = (0..services)
                .map(|i| service(&format!("svc-{i:04}"), &["a", "b"]))
                .collect();
            let pieces: Vec<_> = services.iter().map(piece).collect();
            let (body, kind) = if snapshot {
                (concat(&pieces), Kind::Snapshot(Snapshot { services }))
            } else {
                (
                    delta_body(&pieces, &[]),
                    Kind::Delta(Delta {
                        upserted: services,
                        removed: Vec::new(),
                    }),
                )
            };
            let chunks = frame(9, snapshot, body, stale, Some(&entry.piece));
            let expected = RouteUpdate {
                version: 9,
                kind: Some(kind),
                stale,
                config: Some(entry.config.clone()),
                intentions: None,
            };
            assert_eq!(concat(&chunks), prost_framed(&expected));
        }
    }

    #[test]
    fn an_empty_snapshot_is_still_a_snapshot() {
        let update = decode(&frame(1, true, Bytes::new(), true, None));
        assert_eq!(update.kind, Some(Kind::Snapshot(Snapshot::default())));
        assert!(update.stale);
    }

    #[test]
    fn a_large_body_is_shared_not_copied() {
        let names: Vec<String> = (0..500).map(|i| format!("svc-{i:04}")).collect();
        let services: Vec<_> = names.iter().map(|n| service(n, &["a", "b"])).collect();
        let body = concat(&services.iter().map(piece).collect::<Vec<_>>());
        assert!(body.len() > COPY_BELOW);
        let chunks = frame(2, true, body.clone(), true, None);
        assert_eq!(chunks[1].as_ptr(), body.as_ptr(), "the same buffer");
        let update = decode(&chunks);
        let Some(Kind::Snapshot(s)) = update.kind else {
            panic!("not a snapshot")
        };
        assert_eq!(s.services, services);
        assert!(update.stale);
    }
}
