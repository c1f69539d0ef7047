//! What the layer keeps of a request to build its retries from.
//!
//! The first attempt is handed the caller's request itself; the layer keeps a copy
//! only in case a retry follows, which for most requests it never does. So the copy
//! is made for replay, not for sending: the headers are packed into one buffer.
//!
//! An `http::HeaderMap` clone costs two allocations (its index and its entries), plus
//! one for every header value whose bytes came from a `&str` or `String` (a value
//! built with `HeaderValue::try_from`, as a client builds its `authorization` header:
//! its first clone moves its bytes to a shared buffer), and as many frees. On the
//! success path that was more than the rest of the layer's work together. The packed
//! copy is one allocation and one free, and a copy of the headers' bytes. Packing
//! costs a pass over every header, so only short lists are packed
//! ([`PACK_AT_MOST`]); a longer one, typically parsed by hyper with values that clone
//! by reference count, keeps a clone of its map.
//!
//! The first retry unpacks it into a map (names parsed again, values slices of the
//! packed buffer); every retry after it clones that map, as the layer did before.
//! A header value that `http` itself would refuse (only `unsafe` code builds one) is
//! never packed: the request keeps a clone of its map instead, so a retry sends the
//! same bytes as the first attempt whatever they are.

use http::header::HeaderMap;
use http::request::Parts;
use http::{Extensions, HeaderName, HeaderValue, Method, Uri, Version};

/// The request without its body, as the retries need it.
pub(crate) struct KeptRequest {
    method: Method,
    uri: Uri,
    version: Version,
    headers: KeptHeaders,
    /// Read between attempts by the layer (the budget handle, the pace, the fallback
    /// marker) and handed to every retry.
    pub(crate) extensions: Extensions,
}

/// A request's headers, kept for its retries.
enum KeptHeaders {
    /// Every header as a record `flags: u8, name length: u16, value length: u32`
    /// (little-endian) followed by the name and the value, in the map's order.
    Packed(Vec<u8>),
    /// A map: the packed records unpacked by the first retry, or a clone of the
    /// headers of a request that has too many to pack or one the packing cannot
    /// vouch for.
    Map(HeaderMap),
}

/// Flags, name length, value length.
const RECORD_HEAD: usize = 1 + 2 + 4;
const SENSITIVE: u8 = 1;

impl KeptRequest {
    /// Nothing kept: the request makes only one attempt.
    pub(crate) fn nothing() -> Self {
        KeptRequest {
            method: Method::GET,
            uri: Uri::default(),
            version: Version::default(),
            headers: KeptHeaders::Packed(Vec::new()),
            extensions: Extensions::new(),
        }
    }

    /// A copy of `request` (all but its body) to build retries from.
    pub(crate) fn copy_of<B>(request: &http::Request<B>) -> Self {
        KeptRequest {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: KeptHeaders::pack(request.headers()),
            extensions: request.extensions().clone(),
        }
    }

    /// Makes the headers ready to send again: unpacks them on the first retry.
    /// `false` if they cannot be (a header `http` would not parse back, which only a
    /// bug in `http` could cause): the request is then not retried, and the caller
    /// gets the attempt that failed.
    pub(crate) fn prepare_replay(&mut self) -> bool {
        if let KeptHeaders::Packed(packed) = &mut self.headers {
            match unpack(std::mem::take(packed)) {
                Some(map) => self.headers = KeptHeaders::Map(map),
                None => return false,
            }
        }
        true
    }

    /// Whether the request carries header `name`.
    pub(crate) fn has_header(&self, name: &HeaderName) -> bool {
        match &self.headers {
            KeptHeaders::Map(map) => map.contains_key(name),
            KeptHeaders::Packed(packed) => {
                Records(packed).any(|record| record.name == name.as_str().as_bytes())
            }
        }
    }

    /// The parts of a retry. `last`: no attempt follows, so it takes what is kept
    /// instead of a copy. Call [`prepare_replay`](Self::prepare_replay) first.
    pub(crate) fn replay(&mut self, last: bool) -> Parts {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        let headers = match &mut self.headers {
            KeptHeaders::Map(map) if last => std::mem::take(map),
            KeptHeaders::Map(map) => map.clone(),
            // Not prepared: the layer prepares every retry when it decides on it.
            KeptHeaders::Packed(packed) => {
                debug_assert!(false, "a retry's headers were not prepared");
                unpack(std::mem::take(packed)).unwrap_or_default()
            }
        };
        parts.headers = headers;
        parts.extensions = if last {
            std::mem::take(&mut self.extensions)
        } else {
            self.extensions.clone()
        };
        parts
    }
}

impl KeptHeaders {
    fn pack(headers: &HeaderMap) -> Self {
        if headers.is_empty() {
            return KeptHeaders::Packed(Vec::new());
        }
        if headers.len() > PACK_AT_MOST {
            // See `PACK_AT_MOST`: a long list is cheaper to clone.
            return KeptHeaders::Map(headers.clone());
        }
        // One pass: a guess at the size (most requests' headers fit), grown if not.
        let mut packed = Vec::with_capacity(headers.len() * PACKED_BYTES_PER_HEADER);
        let mut packable = true;
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            let value_bytes = value.as_bytes();
            // `&`, not `&&`: no branch per byte, so the check runs over whole vectors.
            packable &= u32::try_from(value_bytes.len()).is_ok() & is_valid_value(value_bytes);
            let flags = if value.is_sensitive() { SENSITIVE } else { 0 };
            let mut head = [0; RECORD_HEAD];
            head[0] = flags;
            // A header name is at most 65,535 bytes (`http` refuses longer ones); a
            // value longer than `u32::MAX` is not packed.
            head[1..3].copy_from_slice(&(name.len() as u16).to_le_bytes());
            head[3..].copy_from_slice(&(value_bytes.len() as u32).to_le_bytes());
            packed.extend_from_slice(&head);
            packed.extend_from_slice(name);
            packed.extend_from_slice(value_bytes);
        }
        if !packable {
            return KeptHeaders::Map(headers.clone());
        }
        KeptHeaders::Packed(packed)
    }
}

/// The most headers that are packed; a request with more keeps a clone of its map.
///
/// Packing costs a pass over every header; a clone costs the map's two allocations
/// and, per value, either a reference count (a value hyper parsed, or one made from
/// `Bytes` or a `&'static str`) or an allocation (a value made from a `&str` or
/// `String`, on its first clone). Measured with the benchmark's two requests (see
/// BENCHMARKS.md): two headers built in code are packed for less than half of what
/// a clone costs; the fourteen an SDK sends through the proxy, which hyper parsed,
/// cost more to pack than to clone.
const PACK_AT_MOST: usize = 4;

/// The packed bytes reserved per header: a record head, a name and a value of
/// typical lengths.
const PACKED_BYTES_PER_HEADER: usize = 64;

/// `http`'s own rule for a header value's bytes (`HeaderValue::from_bytes`): visible
/// ASCII, space, tab and obs-text; no other control byte.
fn is_valid_value(bytes: &[u8]) -> bool {
    // Eight bytes at a time: a word with no byte below 0x20 and none equal to 0x7f
    // is valid. (Each test is exact for "some byte is": a borrow can only mark
    // bytes above one that truly is.) A tab is below 0x20 but valid, so a word
    // that fails is checked again byte by byte.
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    let mut words = bytes.chunks_exact(8);
    let mut suspect = 0;
    for word in &mut words {
        let mut eight = [0; 8];
        eight.copy_from_slice(word);
        let x = u64::from_ne_bytes(eight);
        let below_space = x.wrapping_sub(ONES * 0x20) & !x;
        let del = x ^ (ONES * 0x7f);
        suspect |= (below_space | (del.wrapping_sub(ONES) & !del)) & HIGHS;
    }
    let rest = words.remainder();
    if suspect == 0 {
        rest.iter().all(|&b| is_valid_byte(b))
    } else {
        bytes.iter().all(|&b| is_valid_byte(b))
    }
}

fn is_valid_byte(b: u8) -> bool {
    (b >= 32 && b != 127) || b == b'\t'
}

/// The packed records back in a map; `None` if one does not parse.
fn unpack(packed: Vec<u8>) -> Option<HeaderMap> {
    // The buffer becomes the values' shared bytes: each value is a slice of it.
    let packed = bytes::Bytes::from(packed);
    let mut map = HeaderMap::with_capacity(Records(&packed).count());
    let mut at = 0;
    for record in Records(&packed) {
        let name = HeaderName::from_bytes(record.name).ok()?;
        let start = at + RECORD_HEAD + record.name.len();
        let end = start + record.value_len;
        at = end;
        let mut value = HeaderValue::from_maybe_shared(packed.slice(start..end)).ok()?;
        value.set_sensitive(record.flags & SENSITIVE != 0);
        map.append(name, value);
    }
    Some(map)
}

/// One packed header.
struct Record<'a> {
    flags: u8,
    name: &'a [u8],
    value_len: usize,
}

/// The records of a packed buffer, in order.
struct Records<'a>(&'a [u8]);

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        let (head, rest) = self.0.split_at_checked(RECORD_HEAD)?;
        let flags = head[0];
        let name_len = usize::from(u16::from_le_bytes([head[1], head[2]]));
        let value_len = u32::from_le_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let (name, rest) = rest.split_at_checked(name_len)?;
        let (_value, rest) = rest.split_at_checked(value_len)?;
        self.0 = rest;
        Some(Record {
            flags,
            name,
            value_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn replayed(map: &HeaderMap) -> HeaderMap {
        let mut request = http::Request::new(());
        *request.headers_mut() = map.clone();
        let mut kept = KeptRequest::copy_of(&request);
        assert!(kept.prepare_replay());
        kept.replay(false).headers
    }

    /// The map's order, as `HeaderMap::iter` gives it, with each value's bytes and
    /// sensitivity: what a retry must send exactly as the first attempt did.
    fn listing(map: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        map.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect()
    }

    #[test]
    fn a_retry_gets_every_header_in_order_with_repeated_names_and_sensitivity() {
        // No more than are packed.
        let mut map = headers(&[
            ("x-custom", "one"),
            ("accept", "text/event-stream"),
            ("x-custom", "two"),
        ]);
        let mut secret = HeaderValue::from_static("Bearer sk-test");
        secret.set_sensitive(true);
        map.insert(http::header::AUTHORIZATION, secret);
        assert_eq!(map.len(), PACK_AT_MOST);
        let again = replayed(&map);
        assert_eq!(listing(&again), listing(&map));
        assert!(again[http::header::AUTHORIZATION].is_sensitive());
    }

    #[test]
    fn headers_are_packed_into_one_buffer_and_unpacked_once() {
        let mut request = http::Request::new(());
        *request.headers_mut() = headers(&[("content-type", "application/json"), ("x-a", "b")]);
        let mut kept = KeptRequest::copy_of(&request);
        let KeptHeaders::Packed(packed) = &kept.headers else {
            panic!("valid headers are packed");
        };
        assert_eq!(
            packed.len(),
            2 * RECORD_HEAD + "content-type".len() + "application/json".len() + "x-a".len() + 1
        );
        assert!(kept.has_header(&http::header::CONTENT_TYPE));
        assert!(!kept.has_header(&http::header::AUTHORIZATION));
        assert!(kept.prepare_replay());
        assert!(matches!(kept.headers, KeptHeaders::Map(_)));
        assert!(kept.has_header(&HeaderName::from_static("x-a")));
        // The last attempt takes the map.
        assert_eq!(&kept.replay(true).headers, request.headers());
        assert!(kept.replay(false).headers.is_empty());
    }

    #[test]
    fn method_uri_version_and_extensions_are_kept() {
        let mut request = http::Request::post("https://api.provider.test/v1/chat/completions")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        request.extensions_mut().insert(7_u32);
        let mut kept = KeptRequest::copy_of(&request);
        assert!(kept.prepare_replay());
        let again = kept.replay(false);
        assert_eq!(again.method, Method::POST);
        assert_eq!(&again.uri, request.uri());
        assert_eq!(again.version, Version::HTTP_2);
        assert_eq!(again.extensions.get::<u32>(), Some(&7));
        // The last attempt takes the extensions too.
        assert_eq!(kept.replay(true).extensions.get::<u32>(), Some(&7));
        assert!(kept.extensions.is_empty());
    }

    #[test]
    fn a_long_header_list_is_cloned_not_packed() {
        let pairs: Vec<(String, String)> = (0..=PACK_AT_MOST)
            .map(|i| (format!("x-h{i}"), format!("v{i}")))
            .collect();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (&**n, &**v)).collect();
        let mut request = http::Request::new(());
        *request.headers_mut() = headers(&pairs[..PACK_AT_MOST]);
        assert!(matches!(
            KeptRequest::copy_of(&request).headers,
            KeptHeaders::Packed(_)
        ));
        *request.headers_mut() = headers(&pairs);
        let kept = KeptRequest::copy_of(&request);
        assert!(matches!(kept.headers, KeptHeaders::Map(_)));
        assert!(kept.has_header(&HeaderName::from_static("x-h0")));
        assert_eq!(
            listing(&replayed(request.headers())),
            listing(request.headers())
        );
    }

    #[test]
    fn a_request_without_headers_keeps_no_buffer() {
        let kept = KeptRequest::copy_of(&http::Request::new(()));
        assert!(matches!(&kept.headers, KeptHeaders::Packed(b) if b.is_empty()));
    }

    #[test]
    fn records_stop_at_a_truncated_buffer() {
        let packed = match KeptHeaders::pack(&headers(&[("x-a", "bcd")])) {
            KeptHeaders::Packed(packed) => packed,
            KeptHeaders::Map(_) => panic!("valid headers are packed"),
        };
        for cut in 0..packed.len() {
            assert_eq!(Records(&packed[..cut]).count(), 0, "cut at {cut}");
        }
        assert_eq!(Records(&packed).count(), 1);
    }

    /// Every byte value, at every place in the eight-byte words and in the tail,
    /// in an otherwise valid value: the packing's rule agrees with `http`'s.
    #[test]
    fn the_value_rule_is_https_for_every_byte_anywhere() {
        for len in 1..=24 {
            for at in 0..len {
                for odd in 0..=u8::MAX {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = odd;
                    assert_eq!(
                        is_valid_value(&bytes),
                        HeaderValue::from_bytes(&bytes).is_ok(),
                        "byte {odd:#04x} at {at} of {len}"
                    );
                }
            }
        }
    }

    proptest! {
        /// The packing's rule for a value is `http`'s: a value it packs always parses
        /// back, and one it refuses is one `http` refuses.
        #[test]
        fn the_value_rule_is_https(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(is_valid_value(&bytes), HeaderValue::from_bytes(&bytes).is_ok());
        }

        /// Any map of valid headers comes back from a retry exactly as it was.
        #[test]
        fn any_headers_come_back_exactly(
            pairs in proptest::collection::vec(
                ("[a-z][a-z0-9-]{0,20}", proptest::collection::vec(
                    prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40),
                 any::<bool>()),
                0..(PACK_AT_MOST + 3))
        ) {
            let mut map = HeaderMap::new();
            for (name, value, sensitive) in &pairs {
                let mut value = HeaderValue::from_bytes(value).unwrap();
                value.set_sensitive(*sensitive);
                map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
            }
            prop_assert_eq!(listing(&replayed(&map)), listing(&map));
        }
    }
}
