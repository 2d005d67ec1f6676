//! Timestamped payloads: the same JSON text is sent through Tether and through the raw
//! baseline, so both carry identical bytes and both receivers pay the same parsing cost.

use std::time::Instant;

/// A monotonic clock shared by the publisher and the subscribers of one process: microseconds
/// since the moment it was created. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Microseconds since the clock's zero.
    pub fn micros(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

const PREFIX: &str = "{\"t\":";
const MIDDLE: &str = ",\"p\":\"";
const SUFFIX: &str = "\"}";

/// The smallest payload [`make_payload`] can build (a one-digit timestamp, no padding).
pub const MIN_PAYLOAD_SIZE: usize = PREFIX.len() + 1 + MIDDLE.len() + SUFFIX.len();

/// A JSON object `{"t":<sent_at_micros>,"p":"xxxx…"}` padded to exactly `size` bytes (or as
/// short as the timestamp allows, when `size` is smaller than that).
pub fn make_payload(size: usize, sent_at_micros: u64) -> String {
    // Cheap on purpose (one allocation, slice copies): the benchmarks measure what carries
    // the payload, not what makes it. (It once padded a character at a time, which cost a
    // sixth of the client thread at 1 KiB, for both systems.)
    use std::fmt::Write as _;
    const PAD: &str = match std::str::from_utf8(&[b'x'; 4096]) {
        Ok(pad) => pad,
        Err(_) => panic!("ASCII is UTF-8"),
    };
    let mut out = String::with_capacity(size.max(MIN_PAYLOAD_SIZE + 20));
    out.push_str(PREFIX);
    let _ = write!(out, "{sent_at_micros}");
    out.push_str(MIDDLE);
    let mut pad = size.saturating_sub(out.len() + SUFFIX.len());
    while pad > 0 {
        let n = pad.min(PAD.len());
        out.push_str(&PAD[..n]);
        pad -= n;
    }
    out.push_str(SUFFIX);
    out
}

/// The send timestamp embedded by [`make_payload`], if `json` carries one. Reads the bytes
/// as they are (no UTF-8 check of the whole payload: the timestamp is the only part read), so
/// the benchmark's own parsing costs both systems the same whether their payload arrived
/// checked or not.
pub fn sent_at(json: impl AsRef<[u8]>) -> Option<u64> {
    let json = json.as_ref();
    let key = b"\"t\":";
    let start = json.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &json[start..];
    let rest = &rest[rest.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_requested_size_and_round_trip_their_timestamp() {
        for size in [64, 1024, 10_000] {
            for ts in [0, 7, 1_234_567_890] {
                let p = make_payload(size, ts);
                assert_eq!(p.len(), size);
                assert_eq!(sent_at(&p), Some(ts));
                let v: serde_json::Value = serde_json::from_str(&p).unwrap();
                assert_eq!(v["t"], ts);
            }
        }
    }

    #[test]
    fn tiny_sizes_still_make_valid_json() {
        let p = make_payload(1, 42);
        assert_eq!(sent_at(&p), Some(42));
        assert!(serde_json::from_str::<serde_json::Value>(&p).is_ok());
    }

    #[test]
    fn text_without_a_timestamp_has_none() {
        assert_eq!(sent_at("{\"x\":1}"), None);
        assert_eq!(sent_at("{\"t\":\"no\"}"), None);
    }
}
