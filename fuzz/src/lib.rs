//! Fuzz targets for Tether's decoders, on stable Rust.
//!
//! cargo-fuzz and libFuzzer need a nightly compiler; this crate is a mutational fuzzer of its
//! own that runs anywhere `cargo` does: it starts from a corpus of valid inputs, mutates them
//! (bit flips, byte edits, splices, truncations, and values known to break parsers: huge
//! numbers, deep nesting, long strings, odd Unicode) with a seeded generator, and checks each
//! result against two targets:
//!
//! * **protocol frames** ([`check_frame`]): [`Frame::decode`] never panics, and whatever it
//!   accepts encodes and decodes back to the same frame;
//! * **v2 binary records** ([`check_records`]): [`v2::decode`] never panics, and whatever it
//!   accepts encodes and decodes back to the same records;
//! * **WebSocket frame headers** ([`check_ws_stream`]): the hub's [`FrameGuard`] and
//!   [`Inbound`] never panic on any byte stream split at any points, never let through a frame
//!   over the limit (checked against actix-http's codec with no limit), and never refuse a
//!   stream of frames within it.
//!
//! `cargo run --release -p tether-fuzz -- --inputs 10000000` runs ten million inputs (see the
//! README for the figures); the test suite runs a short deterministic pass.

use actix_codec::{Decoder as _, Encoder as _};
use actix_http::ws::{Codec, Frame as WsFrame, Message as WsMessage};
use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tether_transport::hub::wire::{FrameGuard, Inbound, InboundError};
use tether_transport::protocol::{v2, Frame, Payload};

/// Valid frames of every type, the corpus mutations start from.
pub const SEEDS: &[&str] = &[
    r#"{"type":"hello","v":1,"client_id":"c-1","token":"t","resume":"s-1","instance":"i-1"}"#,
    r#"{"type":"welcome","v":1,"session":"s-1","resumed":false,"heartbeat_ms":10000,"idle_timeout_ms":25000}"#,
    r#"{"type":"error","code":"shutting_down","category":"service","permanent":false,"message":"m","channel":"c","seq":3,"retry_after_ms":[1000,10000]}"#,
    r#"{"type":"attach","channel":"room","subscribe":true,"resume":{"epoch":"e-1","offset":7},"producer":"p"}"#,
    r#"{"type":"attached","channel":"room","epoch":"e-1","head":9,"resumed":true,"replay":2,"gap":{"from":{"epoch":"e-0","offset":5},"to":{"epoch":"e-1","offset":0}}}"#,
    r#"{"type":"detach","channel":"room"}"#,
    r#"{"type":"detached","channel":"room"}"#,
    r#"{"type":"publish","channel":"room","seq":1,"payload":{"text":"hi","n":[1,2.5,-3e10,null,true]}}"#,
    r#"{"type":"ack","channel":"room","seq":1,"offset":4,"epoch":"e-1","duplicate":false}"#,
    r#"{"type":"message","channel":"room","epoch":"e-1","offset":4,"payload":"\u00e9\ud83d\ude00"}"#,
];

/// Fragments that break parsers, spliced into inputs.
const HOSTILE: &[&str] = &[
    "18446744073709551616",
    "9007199254740993",
    "-0",
    "1e400",
    "NaN",
    "\"\\ud800\"",
    "\u{feff}",
    "\"type\"",
    "{\"type\":",
    "null",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "\\u0000",
    "\"\u{10ffff}\"",
];

/// A seeded mutator over byte strings.
pub struct Mutator {
    rng: StdRng,
}

impl Mutator {
    /// A mutator whose choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        Mutator {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A random integer below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// Applies one to four random edits to `input`.
    pub fn mutate(&mut self, input: &mut Vec<u8>) {
        for _ in 0..1 + self.below(4) {
            let len = input.len();
            match self.below(9) {
                0 if len > 0 => {
                    let i = self.below(len);
                    input[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len);
                    input[i] = self.rng.random();
                }
                2 => {
                    let i = self.below(len + 1);
                    input.insert(i, self.rng.random());
                }
                3 if len > 0 => {
                    let i = self.below(len);
                    let n = self.below(len - i).min(16) + 1;
                    input.drain(i..(i + n).min(len));
                }
                4 if len > 0 => input.truncate(self.below(len)),
                5 => {
                    let fragment = HOSTILE[self.below(HOSTILE.len())].as_bytes();
                    let i = self.below(len + 1);
                    input.splice(i..i, fragment.iter().copied());
                }
                6 => {
                    let other = SEEDS[self.below(SEEDS.len())].as_bytes();
                    let from = self.below(other.len());
                    let i = self.below(len + 1);
                    input.splice(i..i, other[from..].iter().copied());
                }
                7 if len > 0 => {
                    // Repeat a slice: long strings, deep nesting.
                    let i = self.below(len);
                    let n = (self.below(len - i) + 1).min(64);
                    let piece: Vec<u8> = input[i..i + n].to_vec();
                    for _ in 0..self.below(64) {
                        input.splice(i..i, piece.iter().copied());
                    }
                }
                _ => {
                    // A digit run: numbers past every integer type.
                    let i = self.below(len + 1);
                    let digits = vec![b'9'; 1 + self.below(40)];
                    input.splice(i..i, digits);
                }
            }
        }
    }
}

/// Checks one protocol-frame input: no panic; an accepted frame round-trips; the payload JSON
/// check ([`Payload::from_json_bytes`], taking the input as a payload) agrees with serde_json.
pub fn check_frame(input: &[u8]) -> Result<(), String> {
    let checked = Payload::from_json_bytes(Bytes::copy_from_slice(input)).is_ok();
    let serde_json = std::str::from_utf8(input)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
    if checked != serde_json {
        return Err(format!(
            "the payload check says {checked}, serde_json says {serde_json}"
        ));
    }
    let text = String::from_utf8_lossy(input);
    if let Ok(frame) = Frame::decode(&text, 1024 * 1024) {
        let encoded = frame.encode();
        match Frame::decode(&encoded, usize::MAX) {
            Ok(again) if again == frame => {}
            Ok(again) => return Err(format!("round trip changed {frame:?} into {again:?}")),
            Err(e) => {
                return Err(format!(
                    "{frame:?} encoded as {encoded:?} does not decode: {e}"
                ))
            }
        }
    }
    Ok(())
}

/// Valid v2 frames, the corpus of the record target: every seed frame as its record, and a
/// frame of several runs.
pub fn record_seeds() -> Vec<Vec<u8>> {
    let frames: Vec<Frame> = SEEDS
        .iter()
        .filter_map(|s| Frame::decode(s, usize::MAX).ok())
        .filter(|f| !matches!(f, Frame::Hello(_) | Frame::Welcome(_)))
        .collect();
    let mut seeds: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| match tether_transport::hub::Wire::encode(f, 2) {
            tether_transport::hub::Wire::Records(b) | tether_transport::hub::Wire::Text(b) => {
                b.to_vec()
            }
            tether_transport::hub::Wire::Run(run) => {
                let mut buf = BytesMut::new();
                run.write_to(&mut buf);
                buf.to_vec()
            }
        })
        .collect();
    seeds.push(seeds.concat());
    seeds
}

/// Checks one v2 binary frame: no panic; accepted records round-trip.
pub fn check_records(input: &[u8]) -> Result<(), String> {
    let frame = Bytes::copy_from_slice(input);
    if let Ok(records) = v2::decode(&frame, 1024 * 1024) {
        let mut buf = BytesMut::new();
        for r in &records {
            v2::encode(r, &mut buf);
        }
        match v2::decode(&buf.freeze(), usize::MAX) {
            Ok(again) if again == records => {}
            Ok(again) => return Err(format!("round trip changed {records:?} into {again:?}")),
            Err(e) => return Err(format!("{records:?} re-encoded does not decode: {e}")),
        }
    }
    Ok(())
}

/// The payload limit the WebSocket target uses.
pub const WS_MAX: usize = 400;

/// A client byte stream of a few masked frames, each within [`WS_MAX`], built from `m`.
pub fn ws_stream(m: &mut Mutator) -> Vec<u8> {
    let mut codec = Codec::new().client_mode();
    let mut out = BytesMut::new();
    for _ in 0..1 + m.below(4) {
        let seed = SEEDS[m.below(SEEDS.len())];
        let message = match m.below(6) {
            0 => WsMessage::Ping(Bytes::from_static(b"p")),
            1 => WsMessage::Binary(Bytes::copy_from_slice(seed.as_bytes())),
            // Two seeds in one frame: still within the limit.
            2 if seed.len() * 2 <= WS_MAX => WsMessage::Text(seed.repeat(2).into()),
            _ => WsMessage::Text(seed.into()),
        };
        codec.encode(message, &mut out).expect("encodes");
    }
    out.to_vec()
}

/// Checks one WebSocket input: `stream` split into chunks at the points `cuts` gives, through
/// the guard and [`Inbound`]. `pristine` says the stream was not mutated (then it must pass).
pub fn check_ws_stream(stream: &[u8], cuts: &[usize], pristine: bool) -> Result<(), String> {
    // The guard alone, chunk by chunk: what it accepts, an unlimited codec must find within
    // the limit.
    let mut guard = FrameGuard::new(WS_MAX);
    let mut accepted = 0;
    let mut refused = false;
    for chunk in chunks(stream, cuts) {
        match guard.feed(chunk) {
            Ok(()) => accepted += chunk.len(),
            Err(over) => {
                if over.declared <= WS_MAX as u64 {
                    return Err(format!("refused a declared {} <= {WS_MAX}", over.declared));
                }
                accepted += over.before;
                refused = true;
                break;
            }
        }
    }
    if pristine && refused {
        return Err("refused a stream of frames within the limit".into());
    }
    let mut codec = Codec::new().max_size(usize::MAX);
    let mut buf = BytesMut::from(&stream[..accepted]);
    let mut fragmented: Option<usize> = None;
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let (len, data, fin) = match &frame {
            WsFrame::Text(b) | WsFrame::Binary(b) => (b.len(), true, true),
            WsFrame::Ping(b) | WsFrame::Pong(b) => (b.len(), false, true),
            WsFrame::Close(_) => (0, false, true),
            WsFrame::Continuation(item) => match item {
                actix_http::ws::Item::FirstText(b) | actix_http::ws::Item::FirstBinary(b) => {
                    fragmented = Some(0);
                    (b.len(), true, false)
                }
                actix_http::ws::Item::Continue(b) => (b.len(), true, false),
                actix_http::ws::Item::Last(b) => (b.len(), true, true),
            },
        };
        let total = if data {
            fragmented.map(|so_far| so_far + len).unwrap_or(len)
        } else {
            len
        };
        if total > WS_MAX {
            return Err(format!("let through {total} bytes > {WS_MAX}: {frame:?}"));
        }
        if data {
            fragmented = if fin { None } else { Some(total) };
        }
    }
    // The whole reader, as the hub runs it.
    let items: Vec<Result<Bytes, std::io::Error>> = chunks(stream, cuts)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let inbound = Inbound::new(
        tether_transport::hub::wire::Chunks(futures::stream::iter(items)),
        WS_MAX,
    );
    let frames: Vec<Result<WsFrame, InboundError>> =
        futures::executor::block_on(futures::StreamExt::collect(inbound));
    if pristine {
        if let Some(Err(e)) = frames.iter().find(|f| f.is_err()) {
            return Err(format!("pristine stream failed: {e:?}"));
        }
    }
    Ok(())
}

fn chunks<'a>(stream: &'a [u8], cuts: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut at = 0;
    let mut cuts = cuts.iter();
    std::iter::from_fn(move || {
        if at >= stream.len() {
            return None;
        }
        let n = cuts.next().copied().unwrap_or(stream.len()).max(1);
        let end = (at + n).min(stream.len());
        let piece = &stream[at..end];
        at = end;
        Some(piece)
    })
}

/// Totals of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Protocol-frame inputs checked.
    pub frames: u64,
    /// WebSocket streams checked.
    pub streams: u64,
    /// v2 binary frames checked.
    pub records: u64,
}

/// Runs `inputs` inputs from `seed` (in every four: two JSON frames, a v2 binary frame and a
/// WebSocket stream); the
/// first failure is returned with the input that caused it.
pub fn run(inputs: u64, seed: u64) -> Result<Totals, (String, Vec<u8>)> {
    let mut m = Mutator::new(seed);
    let mut totals = Totals::default();
    let record_seeds = record_seeds();
    for i in 0..inputs {
        if i % 4 == 1 {
            let mut input = record_seeds[m.below(record_seeds.len())].clone();
            m.mutate(&mut input);
            match std::panic::catch_unwind(|| check_records(&input)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err((e, input)),
                Err(_) => return Err(("panicked".into(), input)),
            }
            totals.records += 1;
        } else if i % 4 == 3 {
            let mut stream = ws_stream(&mut m);
            let pristine = m.below(8) == 0;
            if !pristine {
                m.mutate(&mut stream);
            }
            let cuts: Vec<usize> = (0..8).map(|_| 1 + m.below(64)).collect();
            check_ws_stream(&stream, &cuts, pristine).map_err(|e| (e, stream.clone()))?;
            totals.streams += 1;
        } else {
            let mut input = SEEDS[m.below(SEEDS.len())].as_bytes().to_vec();
            m.mutate(&mut input);
            let result = std::panic::catch_unwind(|| check_frame(&input));
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err((e, input)),
                Err(_) => return Err(("panicked".into(), input)),
            }
            totals.frames += 1;
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_decodes_and_round_trips() {
        for seed in SEEDS {
            assert!(Frame::decode(seed, usize::MAX).is_ok(), "{seed}");
            check_frame(seed.as_bytes()).unwrap();
        }
    }

    #[test]
    fn pristine_streams_pass_at_any_split() {
        let mut m = Mutator::new(1);
        for _ in 0..500 {
            let stream = ws_stream(&mut m);
            let cuts: Vec<usize> = (0..8).map(|_| 1 + m.below(16)).collect();
            check_ws_stream(&stream, &cuts, true).unwrap();
        }
    }

    #[test]
    fn an_oversized_header_is_caught_by_the_target() {
        let mut stream = vec![0x81, 0x80 | 126];
        stream.extend_from_slice(&(WS_MAX as u16 + 1).to_be_bytes());
        stream.extend_from_slice(&[0, 0, 0, 0]);
        stream.extend(vec![b'x'; WS_MAX + 1]);
        // Refused (not an error of the target): nothing over the limit got through.
        check_ws_stream(&stream, &[3, 5], false).unwrap();
        assert!(check_ws_stream(&stream, &[3, 5], true).is_err());
    }

    #[test]
    fn a_short_deterministic_run_finds_nothing() {
        let totals = run(40_000, 7)
            .unwrap_or_else(|(e, input)| panic!("{e}: {:?}", String::from_utf8_lossy(&input)));
        assert_eq!(totals.frames + totals.records + totals.streams, 40_000);
        assert_eq!(totals.records, 10_000);
    }
}
