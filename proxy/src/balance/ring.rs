//! Consistent hashing: a ring of points (Karger et al.; nginx's and Envoy's
//! `ring_hash`), each instance owning many points placed by the hash of its
//! address. A request's key (a header or a cookie) hashes to a point on the
//! ring and goes to the instance owning the next point, or the next one
//! that may be used. Adding an instance takes over only the keys that fall
//! on its own points (about 1/N of them); removing one moves only its keys.

use http::{HeaderMap, HeaderName, header::COOKIE};

/// What a request's hash key is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// The value of a request header.
    Header(HeaderName),
    /// The value of a cookie.
    Cookie(Box<str>),
}

/// The ring of one service's instances, built the first time it is needed
/// for a routing table.
#[derive(Debug)]
pub struct Ring {
    /// Points sorted by hash, each with the index of its instance.
    points: Box<[(u64, u32)]>,
}

/// Points per instance: many for an even spread on small services, fewer
/// on huge ones to bound the ring's memory (about 1 MiB).
fn points_per_instance(n: usize) -> usize {
    (65_536 / n.max(1)).clamp(16, 160)
}

// === impl HashOn ===

impl HashOn {
    /// The hash of the request's key, `None` when it has none.
    pub fn hash(&self, headers: &HeaderMap) -> Option<u64> {
        match self {
            Self::Header(name) => headers.get(name).map(|v| hash64(v.as_bytes())),
            Self::Cookie(name) => cookie(headers, name).map(hash64),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
            Some(value.trim_ascii())
        })
}

// === impl Ring ===

impl Ring {
    /// The ring of instances at `addrs` (index order is the service's).
    pub fn new<'a>(addrs: impl ExactSizeIterator<Item = (&'a str, u16)>) -> Self {
        let per = points_per_instance(addrs.len());
        let mut points = Vec::with_capacity(addrs.len() * per);
        let mut key = Vec::new();
        for (i, (host, port)) in addrs.enumerate() {
            key.clear();
            key.extend_from_slice(host.as_bytes());
            key.push(b':');
            key.extend_from_slice(port.to_string().as_bytes());
            let base = hash64(&key);
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            for k in 0..per as u64 {
                points.push((fmix64(base ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)), index));
            }
        }
        points.sort_unstable();
        Self {
            points: points.into_boxed_slice(),
        }
    }

    /// The instance owning `hash` that `usable` accepts: the first one
    /// clockwise from it.
    pub fn find(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.points.partition_point(|(h, _)| *h < hash);
        let (wrapped, from) = self.points.split_at(start);
        from.iter()
            .chain(wrapped)
            .map(|(_, i)| *i as usize)
            .find(|i| usable(*i))
    }
}

/// A stable 64-bit hash (FNV-1a, then MurmurHash3's finalizer to spread
/// short keys over the whole ring).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn ring(ports: std::ops::RangeInclusive<u16>) -> (Ring, Vec<u16>) {
        let ports: Vec<u16> = ports.collect();
        (Ring::new(ports.iter().map(|p| ("10.0.0.1", *p))), ports)
    }

    fn owner(r: &(Ring, Vec<u16>), key: u64) -> u16 {
        r.1[r.0.find(hash64(&key.to_le_bytes()), |_| true).unwrap()]
    }

    #[test]
    fn keys_spread_evenly_over_instances() {
        let r = ring(1..=10);
        let mut counts = std::collections::HashMap::new();
        for key in 0..100_000u64 {
            *counts.entry(owner(&r, key)).or_insert(0) += 1;
        }
        for (port, n) in &counts {
            assert!((7_000..=13_000).contains(n), "{port}: {n} of 100000");
        }
    }

    #[test]
    fn adding_an_instance_moves_about_one_key_in_n_and_only_to_it() {
        let before = ring(1..=10);
        let after = ring(1..=11);
        let keys = 100_000u64;
        let mut moved = 0;
        for key in 0..keys {
            let (a, b) = (owner(&before, key), owner(&after, key));
            if a != b {
                assert_eq!(
                    b, 11,
                    "key {key} moved from {a} to {b}, not to the new instance"
                );
                moved += 1;
            }
        }
        let share = moved as f64 / keys as f64;
        assert!(
            (0.06..=0.13).contains(&share),
            "moved {share:.3}, ideal 1/11"
        );
    }

    #[test]
    fn keys_of_an_unusable_instance_go_to_the_next_ones_only() {
        let r = ring(1..=5);
        for key in 0..10_000u64 {
            let h = hash64(&key.to_le_bytes());
            let first = r.0.find(h, |_| true).unwrap();
            let without = r.0.find(h, |i| i != 2).unwrap();
            if first != 2 {
                assert_eq!(
                    first, without,
                    "key {key} moved although its owner is usable"
                );
            }
        }
        assert_eq!(r.0.find(1, |_| false), None);
    }

    #[test]
    fn the_key_comes_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.append(COOKIE, HeaderValue::from_static("a=1; session=s42 ;b=2"));
        let by_header = HashOn::Header(HeaderName::from_static("x-user"));
        let by_cookie = HashOn::Cookie("session".into());
        assert_eq!(by_header.hash(&h), Some(hash64(b"alice")));
        assert_eq!(by_cookie.hash(&h), Some(hash64(b"s42")));
        assert_eq!(HashOn::Cookie("sess".into()).hash(&h), None);
        assert_eq!(
            HashOn::Header(HeaderName::from_static("x-none")).hash(&h),
            None
        );
    }
}
