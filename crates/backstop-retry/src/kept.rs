//! What the layer keeps of a request to build its retries from.
//!
//! The first attempt is handed the caller's request itself; the layer keeps a copy
//! only in case a retry follows, which for most requests it never does. So the copy
//! is made for replay, not for sending: the headers are packed into one buffer.
//!
//! An `http::HeaderMap` clone costs two allocations (its index and its entries), plus
//! one for every name or value whose bytes are not shared yet: a value built from a
//! `&str` or `String` (as a client builds its `authorization` header), and every
//! custom name hyper's parser made (the `x-stainless-*` set an SDK sends through the
//! proxy), move their bytes to a shared buffer on their first clone. And as many
//! frees. On the success path that was more than the rest of the layer's work
//! together. The packed copy is one allocation and one free, whatever the number of
//! headers, and one pass over the headers' bytes. (Only when every name and value is
//! shared already, `from_static` or cloned before, is a clone a little cheaper: see
//! BENCHMARKS.md.)
//!
//! The packed copy holds the headers' bytes a second time while the request is in
//! flight: its size is the header list's, which the caller's HTTP server caps (the
//! sidecar proxy's `--max-header-bytes`), plus seven bytes per header.
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
    /// headers of a request with a value the packing cannot vouch for. Boxed: only
    /// a retry needs it, and every request's state stays small.
    Map(Box<HeaderMap>),
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
                Some(map) => self.headers = KeptHeaders::Map(Box::new(map)),
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
            KeptHeaders::Map(map) if last => std::mem::take(&mut **map),
            KeptHeaders::Map(map) => HeaderMap::clone(map),
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
        // One pass: a guess at the size (most requests' headers fit), grown if not.
        let mut packed = Vec::with_capacity(headers.len() * PACKED_BYTES_PER_HEADER);
        // Set if some value holds a control byte (a tab, or one `http` refuses).
        let mut control = 0;
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            let value_bytes = value.as_bytes();
            // A value longer than `u32::MAX` is not packed.
            let Ok(value_len) = u32::try_from(value_bytes.len()) else {
                return KeptHeaders::Map(Box::new(headers.clone()));
            };
            control |= control_bytes(value_bytes);
            let mut head = [0; RECORD_HEAD];
            head[0] = if value.is_sensitive() { SENSITIVE } else { 0 };
            // A header name is at most 65,535 bytes (`http` refuses longer ones).
            head[1..3].copy_from_slice(&(name.len() as u16).to_le_bytes());
            head[3..].copy_from_slice(&value_len.to_le_bytes());
            packed.reserve(RECORD_HEAD + name.len() + value_bytes.len());
            packed.extend_from_slice(&head);
            packed.extend_from_slice(name);
            packed.extend_from_slice(value_bytes);
        }
        // A tab is valid: only when some value holds a control byte is each checked
        // byte by byte.
        if control != 0
            && !headers
                .values()
                .all(|value| is_valid_value(value.as_bytes()))
        {
            return KeptHeaders::Map(Box::new(headers.clone()));
        }
        KeptHeaders::Packed(packed)
    }
}

/// The packed bytes reserved per header: a record head, a name and a value of
/// typical lengths.
const PACKED_BYTES_PER_HEADER: usize = 64;

/// `http`'s own rule for a header value's bytes (`HeaderValue::from_bytes`): visible
/// ASCII, space, tab and obs-text; no other control byte.
fn is_valid_value(bytes: &[u8]) -> bool {
    control_bytes(bytes) == 0 || bytes.iter().all(|&b| is_valid_byte(b))
}

/// Not zero if and only if `bytes` holds a byte below 0x20 (a tab, or a byte `http`
/// refuses) or the DEL byte; eight bytes at a time, with no branch per byte.
fn control_bytes(bytes: &[u8]) -> u64 {
    if let Some(last) = bytes.last_chunk::<8>() {
        let (words, tail) = bytes.as_chunks::<8>();
        let mut found = 0;
        for word in words {
            found |= control_in_word(*word);
        }
        if !tail.is_empty() {
            // The tail: the last eight bytes, some of them checked already.
            found |= control_in_word(*last);
        }
        found
    } else if let (Some(first), Some(last)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        // Four to seven: the first four and the last four, overlapping.
        let [a, b, c, d] = *first;
        let [e, f, g, h] = *last;
        control_in_word([a, b, c, d, e, f, g, h])
    } else if let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) {
        // One to three: the first, the middle and the last, padded with spaces
        // (which are valid).
        let middle = bytes[bytes.len() / 2];
        control_in_word([first, middle, last, b' ', b' ', b' ', b' ', b' '])
    } else {
        0
    }
}

/// Not zero if and only if one of the eight bytes is below 0x20 or is 0x7f. (Each
/// test is exact for "some byte is": a borrow can only mark bytes above one that
/// truly is.)
fn control_in_word(eight: [u8; 8]) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    let x = u64::from_ne_bytes(eight);
    let below_space = x.wrapping_sub(ONES * 0x20) & !x;
    let del = x ^ (ONES * 0x7f);
    (below_space | (del.wrapping_sub(ONES) & !del)) & HIGHS
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
        let mut map = headers(&[
            ("x-custom", "one"),
            ("accept", "text/event-stream"),
            ("x-custom", "two"),
        ]);
        let mut secret = HeaderValue::from_static("Bearer sk-test");
        secret.set_sensitive(true);
        map.insert(http::header::AUTHORIZATION, secret);
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

    /// The fourteen headers an SDK sends through the proxy, as hyper's parser makes
    /// them: packed like two, and back in the same order.
    #[test]
    fn a_long_header_list_is_packed_too() {
        // Each value a slice of one buffer (the connection's read buffer), each name
        // through `from_bytes`.
        let read = bytes::Bytes::from((0..14).map(|i| format!("value {i:02}")).collect::<String>());
        let mut request = http::Request::new(());
        for i in 0..14 {
            request.headers_mut().append(
                HeaderName::from_bytes(format!("x-stainless-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_maybe_shared(read.slice(i * 8..i * 8 + 8)).unwrap(),
            );
        }
        let kept = KeptRequest::copy_of(&request);
        assert!(matches!(kept.headers, KeptHeaders::Packed(_)));
        assert!(kept.has_header(&HeaderName::from_static("x-stainless-h13")));
        assert_eq!(
            listing(&replayed(request.headers())),
            listing(request.headers())
        );
    }

    /// A tab is a control byte `http` accepts: the quick test flags it, the byte
    /// by byte check clears it, and the headers are packed.
    #[test]
    fn a_value_with_a_tab_is_packed() {
        for value in ["a\tb", "tab\tin a value longer than eight bytes", "\t"] {
            let mut request = http::Request::new(());
            *request.headers_mut() = headers(&[("x-a", "plain"), ("x-b", value)]);
            let kept = KeptRequest::copy_of(&request);
            assert!(matches!(kept.headers, KeptHeaders::Packed(_)), "{value:?}");
            assert_eq!(
                listing(&replayed(request.headers())),
                listing(request.headers())
            );
        }
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
                0..20)
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
