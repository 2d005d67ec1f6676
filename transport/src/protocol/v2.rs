//! Wire protocol v2: the same frames as v1, in binary records, several to a WebSocket frame.
//!
//! A connection speaks v2 once the client's `hello` (always JSON text) asked for `"v":2` and
//! the hub's `welcome` (JSON text) answered `"v":2`. From then on every frame in both directions
//! is a WebSocket **binary** message holding one or more [`Record`]s back to back. The hot
//! frames — publishes, acks and messages — have a binary layout that carries a *run* of
//! consecutive items of one channel (publishes with consecutive seqs, acks of consecutive seqs
//! at consecutive offsets, messages at consecutive offsets) with the channel named once; the
//! rare ones (attach, attached, detach, detached, error) ride as their v1 JSON text inside a
//! [`Record::Control`]. `PROTOCOL.md` gives the byte layout; this module implements it.
//!
//! Every integer is little-endian, fixed width. Payloads are opaque bytes: decoding never looks
//! inside them, and a decoded payload shares the received frame's buffer (no copy).
//!
//! ```
//! use tether_transport::protocol::{v2, Epoch, Offset, Payload};
//! let run = v2::Record::Message(v2::MessageRun {
//!     channel: "room".into(),
//!     epoch: Epoch("e1".into()),
//!     first_offset: Offset(7),
//!     payloads: vec![Payload::from_json("1").unwrap(), Payload::from_json("2").unwrap()],
//! });
//! let mut buf = bytes::BytesMut::new();
//! v2::encode(&run, &mut buf);
//! let records = v2::decode(&buf.freeze(), 1 << 20).unwrap();
//! assert_eq!(records, vec![run]);
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Ack, Epoch, Frame, Message, Offset, Payload, Publish};
use crate::error::TransportError;

/// Record kind: a v1 JSON frame (attach, attached, detach, detached, error).
pub const KIND_CONTROL: u8 = 0x01;
/// Record kind: a run of publishes.
pub const KIND_PUBLISH: u8 = 0x02;
/// Record kind: a run of acks.
pub const KIND_ACK: u8 = 0x03;
/// Record kind: a run of messages.
pub const KIND_MESSAGE: u8 = 0x04;

/// Ack flag: the publishes had already been stored (replays).
pub const ACK_DUPLICATE: u8 = 0x01;
/// Ack flag: an epoch and first offset follow.
pub const ACK_HAS_OFFSET: u8 = 0x02;

/// One v2 record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A frame without a binary layout of its own, as v1 JSON.
    Control(Frame),
    /// Publishes `first_seq, first_seq + 1, …` on one channel.
    Publish(PublishRun),
    /// Acks of `first_seq ..` on one channel.
    Ack(AckRun),
    /// Messages at `first_offset ..` of one channel.
    Message(MessageRun),
}

/// Consecutive publishes of one channel (client → hub).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishRun {
    /// Channel name.
    pub channel: String,
    /// The first publish's sequence number; the others follow it by one.
    pub first_seq: u64,
    /// The publishes' payloads, in seq order (at least one).
    pub payloads: Vec<Payload>,
}

/// Acks of consecutive publishes of one channel (hub → client): seq `first_seq + i` was stored
/// at offset `first_offset + i`.
#[derive(Debug, Clone, PartialEq)]
pub struct AckRun {
    /// Channel name.
    pub channel: String,
    /// The first acknowledged sequence number.
    pub first_seq: u64,
    /// How many consecutive seqs are acknowledged (at least one).
    pub count: u32,
    /// Whether they had already been stored (replays).
    pub duplicate: bool,
    /// The epoch and the offset of the first; absent for duplicates whose offsets the hub no
    /// longer remembers.
    pub stored: Option<(Epoch, Offset)>,
}

/// Consecutive messages of one channel (hub → client).
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRun {
    /// Channel name.
    pub channel: String,
    /// The channel epoch.
    pub epoch: Epoch,
    /// The first message's offset; the others follow it by one.
    pub first_offset: Offset,
    /// The messages' payloads, in offset order (at least one).
    pub payloads: Vec<Payload>,
}

impl AckRun {
    /// The run as single v1 acks.
    pub fn acks(&self) -> impl Iterator<Item = Ack> + '_ {
        (0..u64::from(self.count)).map(move |i| Ack {
            channel: self.channel.clone(),
            seq: self.first_seq + i,
            offset: self.stored.as_ref().map(|(_, o)| Offset(o.0 + i)),
            epoch: self.stored.as_ref().map(|(e, _)| e.clone()),
            duplicate: self.duplicate,
        })
    }
}

impl Record {
    /// Bytes the record takes on the wire.
    pub fn encoded_len(&self) -> usize {
        fn payloads(p: &[Payload]) -> usize {
            p.iter().map(|p| 4 + p.len()).sum()
        }
        match self {
            Record::Control(frame) => 1 + 4 + frame.encode().len(),
            Record::Publish(r) => 1 + 2 + r.channel.len() + 8 + 4 + payloads(&r.payloads),
            Record::Ack(r) => {
                1 + 2
                    + r.channel.len()
                    + 8
                    + 4
                    + 1
                    + r.stored.as_ref().map_or(0, |(e, _)| 2 + e.0.len() + 8)
            }
            Record::Message(r) => {
                1 + 2 + r.channel.len() + 2 + r.epoch.0.len() + 8 + 4 + payloads(&r.payloads)
            }
        }
    }

    /// The record as the frames it stands for, in order.
    pub fn into_frames(self) -> Vec<Frame> {
        match self {
            Record::Control(frame) => vec![frame],
            Record::Publish(r) => {
                let channel = r.channel;
                (r.first_seq..)
                    .zip(r.payloads)
                    .map(|(seq, payload)| {
                        Frame::Publish(Publish {
                            channel: channel.clone(),
                            seq,
                            payload,
                        })
                    })
                    .collect()
            }
            Record::Ack(r) => r.acks().map(Frame::Ack).collect(),
            Record::Message(r) => {
                let (channel, epoch) = (r.channel, r.epoch);
                (r.first_offset.0..)
                    .zip(r.payloads)
                    .map(|(offset, payload)| {
                        Frame::Message(Message {
                            channel: channel.clone(),
                            epoch: epoch.clone(),
                            offset: Offset(offset),
                            payload,
                        })
                    })
                    .collect()
            }
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &str) {
    // Channel names, epochs and such are far below 64 KiB (the hub refuses longer names).
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.put_u16_le(len);
    buf.put_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_payloads(buf: &mut BytesMut, payloads: &[Payload]) {
    buf.put_u32_le(payloads.len() as u32);
    for p in payloads {
        buf.put_u32_le(p.len() as u32);
        buf.put_slice(p.as_bytes());
    }
}

/// Appends `record` to `buf`.
pub fn encode(record: &Record, buf: &mut BytesMut) {
    if !matches!(record, Record::Control(_)) {
        // (A control record's length is its JSON's: known once encoded, below, not twice.)
        buf.reserve(record.encoded_len());
    }
    match record {
        Record::Control(frame) => {
            let text = frame.encode();
            buf.reserve(5 + text.len());
            buf.put_u8(KIND_CONTROL);
            buf.put_u32_le(text.len() as u32);
            buf.put_slice(text.as_bytes());
        }
        Record::Publish(r) => {
            buf.put_u8(KIND_PUBLISH);
            put_str(buf, &r.channel);
            buf.put_u64_le(r.first_seq);
            put_payloads(buf, &r.payloads);
        }
        Record::Ack(r) => {
            buf.put_u8(KIND_ACK);
            put_str(buf, &r.channel);
            buf.put_u64_le(r.first_seq);
            buf.put_u32_le(r.count);
            let mut flags = 0;
            if r.duplicate {
                flags |= ACK_DUPLICATE;
            }
            if r.stored.is_some() {
                flags |= ACK_HAS_OFFSET;
            }
            buf.put_u8(flags);
            if let Some((epoch, offset)) = &r.stored {
                put_str(buf, &epoch.0);
                buf.put_u64_le(offset.0);
            }
        }
        Record::Message(r) => {
            buf.put_u8(KIND_MESSAGE);
            put_str(buf, &r.channel);
            put_str(buf, &r.epoch.0);
            buf.put_u64_le(r.first_offset.0);
            put_payloads(buf, &r.payloads);
        }
    }
}

/// Appends a message run to `buf` without building a [`Record`] (the hub's fan-out encodes
/// straight from its stored messages).
pub fn encode_messages<'a>(
    buf: &mut BytesMut,
    channel: &str,
    epoch: &Epoch,
    first_offset: Offset,
    payloads: impl ExactSizeIterator<Item = &'a Payload> + Clone,
) {
    let len: usize = payloads.clone().map(|p| 4 + p.len()).sum();
    buf.reserve(message_head_len(channel, epoch) + len);
    put_message_head(buf, channel, epoch, first_offset, payloads.len());
    for p in payloads {
        buf.put_u32_le(p.len() as u32);
        buf.put_slice(p.as_bytes());
    }
}

/// Bytes a message run's header takes (kind, channel, epoch, first offset, count).
fn message_head_len(channel: &str, epoch: &Epoch) -> usize {
    1 + 2 + channel.len() + 2 + epoch.0.len() + 8 + 4
}

/// Writes a message run's header: what precedes its `count` payloads.
fn put_message_head(
    buf: &mut BytesMut,
    channel: &str,
    epoch: &Epoch,
    first_offset: Offset,
    count: usize,
) {
    buf.put_u8(KIND_MESSAGE);
    put_str(buf, channel);
    put_str(buf, &epoch.0);
    buf.put_u64_le(first_offset.0);
    buf.put_u32_le(count as u32);
}

/// A message run kept as its parts: the record's header, encoded, and the payloads, shared.
/// A hub fanning one run out to many subscribers copies each payload once per subscriber,
/// straight into that socket's write buffer ([`SharedMessageRun::write_to`]), instead of first
/// into an encoded record (a large fresh buffer per fan-out) and then again into each socket's
/// buffer. Cloning one is a reference count.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedMessageRun {
    head: Bytes,
    payloads: std::sync::Arc<[Payload]>,
    len: usize,
}

impl SharedMessageRun {
    /// The run of `payloads` (at least one) of `channel` in `epoch` from `first_offset`.
    pub fn new(
        channel: &str,
        epoch: &Epoch,
        first_offset: Offset,
        payloads: std::sync::Arc<[Payload]>,
    ) -> Self {
        let mut head = BytesMut::with_capacity(message_head_len(channel, epoch));
        put_message_head(&mut head, channel, epoch, first_offset, payloads.len());
        let len = head.len() + payloads.iter().map(payload_len).sum::<usize>();
        SharedMessageRun {
            head: head.freeze(),
            payloads,
            len,
        }
    }

    /// Its encoded size: what [`SharedMessageRun::write_to`] appends.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: a run holds at least one message).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the record, exactly as [`encode_messages`] encodes it.
    pub fn write_to(&self, buf: &mut BytesMut) {
        buf.reserve(self.len);
        buf.put_slice(&self.head);
        for p in self.payloads.iter() {
            buf.put_u32_le(p.len() as u32);
            buf.put_slice(p.as_bytes());
        }
    }
}

/// Bytes a publish run's header takes on the wire (kind, channel, first seq, count).
pub fn publish_header_len(channel: &str) -> usize {
    1 + 2 + channel.len() + 8 + 4
}

/// Bytes one payload takes inside a run (its length prefix and its bytes).
pub fn payload_len(payload: &Payload) -> usize {
    4 + payload.len()
}

/// The records gathered for the next binary WebSocket frame of a connection, with the
/// buffer they are encoded into (kept across frames: no allocation per frame once warm).
///
/// Pure: the socket actor feeds it frames and publish runs, writes every frame it hands back
/// (a batch that reached its byte limit), and calls [`Batch::finish`] when its mailbox is
/// drained. A publish run following the last record's run of the same channel with the next
/// seq joins it; a run is split where the byte limit falls (a single payload larger than the
/// limit goes alone in its own frame; one larger than the frame limit is refused).
#[derive(Debug)]
pub struct Batch {
    records: Vec<Record>,
    bytes: usize,
    limit: usize,
    max_frame: usize,
    headroom: usize,
    buf: BytesMut,
}

impl Batch {
    /// An empty batch of at most `limit` bytes per frame (beyond which a frame is cut), where
    /// no frame may exceed `max_frame` bytes.
    pub fn new(limit: usize, max_frame: usize) -> Self {
        Batch {
            records: Vec::new(),
            bytes: 0,
            limit: limit.min(max_frame),
            max_frame,
            headroom: 0,
            buf: BytesMut::new(),
        }
    }

    /// Starts every frame with `n` bytes left free in front of its records, for a header the
    /// transport writes there (a WebSocket client's frame header: the frame then goes to the
    /// socket's write buffer without being copied again). Default 0.
    pub fn with_headroom(mut self, n: usize) -> Self {
        self.headroom = n;
        self
    }

    /// Offers `buf`, a buffer a finished frame has been written out of, for the next frame:
    /// taken when it has more room than the batch's own (records are encoded into the buffer
    /// only when a frame is finished, so it holds nothing), so the next frame reuses that
    /// allocation instead of a fresh one.
    pub fn recycle(&mut self, mut buf: BytesMut) {
        buf.clear();
        if buf.capacity() > self.buf.capacity() {
            self.buf = buf;
        }
    }

    /// Whether nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Encoded bytes gathered so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The records gathered so far, oldest first.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Adds a frame; a publish becomes (or joins) a publish run. Frames completed on the way
    /// are appended to `out`, in order.
    pub fn push_frame(
        &mut self,
        frame: Frame,
        out: &mut Vec<BytesMut>,
    ) -> Result<(), TransportError> {
        let frame = match frame {
            Frame::Publish(p) => {
                return self.push_publishes(
                    PublishRun {
                        channel: p.channel,
                        first_seq: p.seq,
                        payloads: vec![p.payload],
                    },
                    out,
                )
            }
            other => other,
        };
        let record = Record::Control(frame);
        let added = record.encoded_len();
        if added > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                size: added,
                max: self.max_frame,
            });
        }
        if self.bytes + added > self.limit {
            out.extend(self.finish());
        }
        self.records.push(record);
        self.bytes += added;
        self.cut_if_full(out);
        Ok(())
    }

    /// Adds a run of publishes. Frames completed on the way are appended to `out`, in order.
    /// On an error (a payload too large for any frame) nothing of the run from that payload
    /// on is gathered.
    pub fn push_publishes(
        &mut self,
        run: PublishRun,
        out: &mut Vec<BytesMut>,
    ) -> Result<(), TransportError> {
        if run.payloads.is_empty() {
            return Ok(());
        }
        let header = publish_header_len(&run.channel);
        // The common case: a run that neither continues the last one nor overflows goes in
        // as it is (no allocation).
        if !self.continues(&run.channel, run.first_seq) {
            let len = header + run.payloads.iter().map(payload_len).sum::<usize>();
            if self.bytes + len <= self.limit {
                self.records.push(Record::Publish(run));
                self.bytes += len;
                self.cut_if_full(out);
                return Ok(());
            }
        }
        // The slow path, payload by payload: the name is cloned once per record made.
        let PublishRun {
            channel,
            first_seq,
            payloads,
        } = run;
        let count = payloads.len();
        for (i, (seq, payload)) in (first_seq..).zip(payloads).enumerate() {
            let add = payload_len(&payload);
            if self.continues(&channel, seq) && self.bytes + add <= self.limit {
                if let Some(Record::Publish(last)) = self.records.last_mut() {
                    last.payloads.push(payload);
                }
                self.bytes += add;
            } else {
                if header + add > self.max_frame {
                    return Err(TransportError::FrameTooLarge {
                        size: header + add,
                        max: self.max_frame,
                    });
                }
                if self.bytes + header + add > self.limit {
                    out.extend(self.finish());
                }
                let mut payloads = Vec::with_capacity(count - i);
                payloads.push(payload);
                self.records.push(Record::Publish(PublishRun {
                    channel: channel.clone(),
                    first_seq: seq,
                    payloads,
                }));
                self.bytes += header + add;
            }
            self.cut_if_full(out);
        }
        Ok(())
    }

    /// Encodes what is gathered as one frame, leaving the batch empty (`None` when it was):
    /// the headroom ([`Batch::with_headroom`]) as zero bytes, then the records.
    pub fn finish(&mut self) -> Option<BytesMut> {
        if self.records.is_empty() {
            return None;
        }
        self.buf.reserve(self.headroom + self.bytes);
        self.buf.put_bytes(0, self.headroom);
        for record in self.records.drain(..) {
            encode(&record, &mut self.buf);
        }
        self.bytes = 0;
        // The whole buffer goes with the frame (not a split sharing it with what is left
        // here): whoever writes it owns it alone and can hand it back ([`Batch::recycle`]).
        Some(std::mem::take(&mut self.buf))
    }

    fn cut_if_full(&mut self, out: &mut Vec<BytesMut>) {
        if self.bytes >= self.limit {
            out.extend(self.finish());
        }
    }

    /// Whether a publish of `channel` with `seq` continues the last record.
    fn continues(&self, channel: &str, seq: u64) -> bool {
        matches!(self.records.last(), Some(Record::Publish(last))
            if last.channel == channel && last.first_seq + last.payloads.len() as u64 == seq)
    }
}

fn malformed(reason: impl Into<String>) -> TransportError {
    TransportError::MalformedFrame {
        reason: reason.into(),
    }
}

/// Reads records out of one binary frame, never copying a payload.
struct Reader<'a> {
    frame: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.frame.len() - self.pos
    }

    fn need(&self, n: usize, what: &str) -> Result<(), TransportError> {
        if self.remaining() < n {
            Err(malformed(format!(
                "v2 record truncated in {what}: {n} bytes needed, {} left",
                self.remaining()
            )))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8, TransportError> {
        self.need(1, what)?;
        let v = self.frame[self.pos];
        self.pos += 1;
        Ok(v)
    }

    fn u16(&mut self, what: &str) -> Result<u16, TransportError> {
        self.need(2, what)?;
        let v = (&self.frame[self.pos..]).get_u16_le();
        self.pos += 2;
        Ok(v)
    }

    fn u32(&mut self, what: &str) -> Result<u32, TransportError> {
        self.need(4, what)?;
        let v = (&self.frame[self.pos..]).get_u32_le();
        self.pos += 4;
        Ok(v)
    }

    fn u64(&mut self, what: &str) -> Result<u64, TransportError> {
        self.need(8, what)?;
        let v = (&self.frame[self.pos..]).get_u64_le();
        self.pos += 8;
        Ok(v)
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, TransportError> {
        self.need(n, what)?;
        let v = self.frame.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(v)
    }

    fn str(&mut self, what: &str) -> Result<String, TransportError> {
        let len = usize::from(self.u16(what)?);
        self.need(len, what)?;
        let text = std::str::from_utf8(&self.frame[self.pos..self.pos + len])
            .map_err(|e| malformed(format!("{what} is not UTF-8: {e}")))?
            .to_owned();
        self.pos += len;
        Ok(text)
    }

    fn count(&mut self, what: &str, least_each: usize) -> Result<usize, TransportError> {
        let n = self.u32(what)? as usize;
        if n == 0 {
            return Err(malformed(format!("v2 {what} run of zero items")));
        }
        // Each item takes at least `least_each` bytes: a count the frame cannot hold is refused
        // before anything is allocated for it.
        if n.saturating_mul(least_each) > self.remaining() {
            return Err(malformed(format!(
                "v2 {what} run of {n} items does not fit the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n)
    }

    fn payloads(&mut self, what: &str) -> Result<Vec<Payload>, TransportError> {
        let n = self.count(what, 4)?;
        let mut payloads = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.u32(what)? as usize;
            payloads.push(Payload::from_unchecked(self.bytes(len, what)?));
        }
        Ok(payloads)
    }
}

/// Decodes one binary WebSocket message into its records.
///
/// Errors are [`TransportError::FrameTooLarge`] (more than `max_size` bytes) and
/// [`TransportError::MalformedFrame`] (truncated or trailing bytes, an unknown record kind, a
/// run of zero items, a count the frame cannot hold, a control record that is not a v1
/// control frame). Payloads are not checked (they are opaque to the protocol).
pub fn decode(frame: &Bytes, max_size: usize) -> Result<Vec<Record>, TransportError> {
    if frame.len() > max_size {
        return Err(TransportError::FrameTooLarge {
            size: frame.len(),
            max: max_size,
        });
    }
    if frame.is_empty() {
        return Err(malformed("empty v2 frame"));
    }
    let mut r = Reader { frame, pos: 0 };
    let mut records = Vec::new();
    while r.remaining() > 0 {
        let record = match r.u8("record kind")? {
            KIND_CONTROL => {
                let len = r.u32("control record")? as usize;
                let text = r.bytes(len, "control record")?;
                let text = std::str::from_utf8(&text)
                    .map_err(|e| malformed(format!("control record is not UTF-8: {e}")))?;
                let frame = Frame::decode(text, max_size)?;
                if matches!(frame, Frame::Hello(_) | Frame::Welcome(_)) {
                    return Err(malformed(format!(
                        "a {} cannot ride in a v2 record (the handshake is JSON text)",
                        frame.kind()
                    )));
                }
                Record::Control(frame)
            }
            KIND_PUBLISH => {
                let channel = r.str("publish channel")?;
                let first_seq = r.u64("publish seq")?;
                let payloads = r.payloads("publish")?;
                Record::Publish(PublishRun {
                    channel,
                    first_seq,
                    payloads,
                })
            }
            KIND_ACK => {
                let channel = r.str("ack channel")?;
                let first_seq = r.u64("ack seq")?;
                let count = r.u32("ack count")?;
                if count == 0 {
                    return Err(malformed("v2 ack run of zero items"));
                }
                let flags = r.u8("ack flags")?;
                if flags & !(ACK_DUPLICATE | ACK_HAS_OFFSET) != 0 {
                    return Err(malformed(format!("unknown v2 ack flags {flags:#04x}")));
                }
                let stored = if flags & ACK_HAS_OFFSET != 0 {
                    let epoch = Epoch(r.str("ack epoch")?.into());
                    Some((epoch, Offset(r.u64("ack offset")?)))
                } else {
                    None
                };
                Record::Ack(AckRun {
                    channel,
                    first_seq,
                    count,
                    duplicate: flags & ACK_DUPLICATE != 0,
                    stored,
                })
            }
            KIND_MESSAGE => {
                let channel = r.str("message channel")?;
                let epoch = Epoch(r.str("message epoch")?.into());
                let first_offset = Offset(r.u64("message offset")?);
                let payloads = r.payloads("message")?;
                Record::Message(MessageRun {
                    channel,
                    epoch,
                    first_offset,
                    payloads,
                })
            }
            other => return Err(malformed(format!("unknown v2 record kind {other:#04x}"))),
        };
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_message_run_writes_what_encode_messages_encodes() {
        let payloads: std::sync::Arc<[Payload]> = vec![
            Payload::from_value(&1).unwrap(),
            Payload::from_json("{\"a\":[true,null]}").unwrap(),
            Payload::from_unchecked(Bytes::from_static(b"")),
        ]
        .into();
        let epoch = Epoch("e7".into());
        let mut expected = BytesMut::new();
        encode_messages(&mut expected, "room/1", &epoch, Offset(41), payloads.iter());
        let run = SharedMessageRun::new("room/1", &epoch, Offset(41), payloads);
        let mut written = BytesMut::from(&b"before"[..]);
        run.write_to(&mut written);
        assert_eq!(&written[..6], b"before");
        assert_eq!(&written[6..], &expected[..]);
        assert_eq!(run.len(), expected.len());
    }
    use crate::protocol::{Attach, ErrorCode, ErrorFrame};

    fn p(json: &str) -> Payload {
        Payload::from_json(json).unwrap()
    }

    fn all() -> Vec<Record> {
        vec![
            Record::Control(Frame::Attach(Attach {
                channel: "room".into(),
                subscribe: true,
                resume: None,
                producer: Some("p".into()),
            })),
            Record::Publish(PublishRun {
                channel: "room".into(),
                first_seq: 41,
                payloads: vec![p("1"), p(r#"{"a":"ü"}"#)],
            }),
            Record::Ack(AckRun {
                channel: "room".into(),
                first_seq: 41,
                count: 2,
                duplicate: false,
                stored: Some((Epoch("e1".into()), Offset(9))),
            }),
            Record::Ack(AckRun {
                channel: "room".into(),
                first_seq: 3,
                count: 1,
                duplicate: true,
                stored: None,
            }),
            Record::Message(MessageRun {
                channel: "room".into(),
                epoch: Epoch("e1".into()),
                first_offset: Offset(9),
                payloads: vec![p("1"), p("[]")],
            }),
            Record::Control(Frame::Error(ErrorFrame::from_error(
                &TransportError::Remote {
                    code: ErrorCode::NotAttached,
                    category: crate::error::ErrorCategory::Subscription,
                    permanent: true,
                    message: "attach first".into(),
                },
            ))),
        ]
    }

    fn encode_all(records: &[Record]) -> Bytes {
        let mut buf = BytesMut::new();
        for r in records {
            let before = buf.len();
            encode(r, &mut buf);
            assert_eq!(buf.len() - before, r.encoded_len(), "{r:?}");
        }
        buf.freeze()
    }

    #[test]
    fn every_record_round_trips_in_one_frame() {
        let records = all();
        let frame = encode_all(&records);
        assert_eq!(decode(&frame, 1 << 20).unwrap(), records);
    }

    #[test]
    fn decoded_payloads_share_the_frame() {
        let frame = encode_all(&all()[1..2]);
        let Record::Publish(run) = &decode(&frame, 1 << 20).unwrap()[0] else {
            panic!("a publish run")
        };
        let inside = frame.as_ptr_range();
        assert!(inside.contains(&run.payloads[0].as_bytes().as_ptr()));
    }

    #[test]
    fn runs_expand_into_their_frames() {
        let frames = all()[2].clone().into_frames();
        assert_eq!(frames.len(), 2);
        match &frames[1] {
            Frame::Ack(a) => {
                assert_eq!((a.seq, a.offset), (42, Some(Offset(10))));
                assert_eq!(a.epoch, Some(Epoch("e1".into())));
            }
            other => panic!("{other:?}"),
        }
        let messages = all()[4].clone().into_frames();
        assert!(matches!(&messages[1], Frame::Message(m) if m.offset == Offset(10)));
    }

    #[test]
    fn the_fan_out_encoder_matches_the_record_encoder() {
        let Record::Message(run) = &all()[4] else {
            unreachable!()
        };
        let mut direct = BytesMut::new();
        encode_messages(
            &mut direct,
            &run.channel,
            &run.epoch,
            run.first_offset,
            run.payloads.iter(),
        );
        assert_eq!(direct.freeze(), encode_all(&all()[4..5]));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let frame = encode_all(&all());
        for cut in 1..frame.len() {
            let short = frame.slice(..cut);
            match decode(&short, 1 << 20) {
                Err(TransportError::MalformedFrame { .. }) => {}
                // A cut on a record boundary is a shorter, valid frame.
                Ok(records) => assert!(records.len() < all().len(), "cut at {cut}"),
                Err(other) => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn hostile_counts_and_kinds_are_refused_without_allocating() {
        let mut buf = BytesMut::new();
        buf.put_u8(KIND_MESSAGE);
        put_str(&mut buf, "room");
        put_str(&mut buf, "e");
        buf.put_u64_le(1);
        buf.put_u32_le(u32::MAX);
        let err = decode(&buf.freeze(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");

        for bad in [
            &[0x7f_u8][..],
            &[KIND_ACK, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            let err = decode(&Bytes::copy_from_slice(bad), 1 << 20).unwrap_err();
            assert!(
                matches!(err, TransportError::MalformedFrame { .. }),
                "{err}"
            );
        }
        let big = encode_all(&all());
        assert!(matches!(
            decode(&big, 10),
            Err(TransportError::FrameTooLarge { .. })
        ));
        assert!(decode(&Bytes::new(), 10).is_err());
    }

    #[test]
    fn the_handshake_cannot_ride_in_a_record() {
        let hello = r#"{"type":"hello","v":2,"client_id":"c"}"#;
        let mut buf = BytesMut::new();
        buf.put_u8(KIND_CONTROL);
        buf.put_u32_le(hello.len() as u32);
        buf.put_slice(hello.as_bytes());
        assert!(decode(&buf.freeze(), 1 << 20).is_err());
    }

    #[test]
    fn the_example_in_protocol_md_is_what_the_codec_writes() {
        let mut buf = BytesMut::new();
        encode(
            &Record::Message(MessageRun {
                channel: "room".into(),
                epoch: Epoch("e1".into()),
                first_offset: Offset(71),
                payloads: vec![p("1"), p("{}")],
            }),
            &mut buf,
        );
        encode(
            &Record::Ack(AckRun {
                channel: "room".into(),
                first_seq: 12,
                count: 2,
                duplicate: false,
                stored: Some((Epoch("e1".into()), Offset(71))),
            }),
            &mut buf,
        );
        let hex: Vec<String> = buf.iter().map(|b| format!("{b:02x}")).collect();
        let expected = "04 04 00 72 6f 6f 6d 02 00 65 31 47 00 00 00 00 00 00 00 02 00 00 00 \
                        01 00 00 00 31 02 00 00 00 7b 7d \
                        03 04 00 72 6f 6f 6d 0c 00 00 00 00 00 00 00 02 00 00 00 02 \
                        02 00 65 31 47 00 00 00 00 00 00 00";
        assert_eq!(
            hex.join(" "),
            expected.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }

    fn run(channel: &str, first_seq: u64, payloads: &[&str]) -> PublishRun {
        PublishRun {
            channel: channel.into(),
            first_seq,
            payloads: payloads.iter().map(|t| p(t)).collect(),
        }
    }

    /// Every record of `frames`, decoded.
    fn records_of(frames: &[BytesMut]) -> Vec<Record> {
        frames
            .iter()
            .flat_map(|f| decode(&f.clone().freeze(), 1 << 20).unwrap())
            .collect()
    }

    #[test]
    fn a_batch_merges_consecutive_runs_of_a_channel_and_splits_at_a_switch() {
        let mut batch = Batch::new(1 << 16, 1 << 20);
        let mut out = Vec::new();
        batch
            .push_publishes(run("a", 1, &["1", "2"]), &mut out)
            .unwrap();
        batch.push_publishes(run("a", 3, &["3"]), &mut out).unwrap();
        // A gap in the seqs, another channel, then a control frame: three more records.
        batch.push_publishes(run("a", 5, &["5"]), &mut out).unwrap();
        batch.push_publishes(run("b", 6, &["6"]), &mut out).unwrap();
        batch
            .push_frame(
                Frame::Detach(super::super::Detach {
                    channel: "a".into(),
                }),
                &mut out,
            )
            .unwrap();
        // A single publish frame continues its run too.
        batch
            .push_frame(
                Frame::Publish(Publish {
                    channel: "b".into(),
                    seq: 7,
                    payload: p("7"),
                }),
                &mut out,
            )
            .unwrap();
        assert!(out.is_empty(), "nothing is full yet");
        let expected_bytes: usize = batch.records().iter().map(Record::encoded_len).sum();
        assert_eq!(batch.bytes(), expected_bytes);
        let frame = batch.finish().unwrap().freeze();
        assert!(batch.is_empty() && batch.bytes() == 0 && batch.finish().is_none());
        assert_eq!(frame.len(), expected_bytes);
        assert_eq!(
            decode(&frame, 1 << 20).unwrap(),
            vec![
                Record::Publish(run("a", 1, &["1", "2", "3"])),
                Record::Publish(run("a", 5, &["5"])),
                Record::Publish(run("b", 6, &["6"])),
                Record::Control(Frame::Detach(super::super::Detach {
                    channel: "a".into()
                })),
                Record::Publish(run("b", 7, &["7"])),
            ]
        );
    }

    #[test]
    fn a_batch_cuts_frames_at_its_byte_limit_and_keeps_the_order() {
        // Header 1+2+1+8+4 = 16 bytes, each payload "1234" 8: a 40-byte limit holds 3.
        let limit = 40;
        let mut batch = Batch::new(limit, 1 << 20);
        let mut out = Vec::new();
        let payloads = ["1234"; 10];
        batch
            .push_publishes(run("a", 1, &payloads), &mut out)
            .unwrap();
        batch
            .push_publishes(run("a", 11, &["1234"]), &mut out)
            .unwrap();
        out.extend(batch.finish());
        assert!(
            out.iter().all(|f| f.len() <= limit),
            "{:?}",
            out.iter().map(|f| f.len()).collect::<Vec<_>>()
        );
        let records = records_of(&out);
        let seqs: Vec<u64> = records
            .iter()
            .flat_map(|r| match r {
                Record::Publish(r) => r.first_seq..r.first_seq + r.payloads.len() as u64,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
        // One record per frame here, each as full as the limit allows (3 + 3 + 3 + 2).
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn a_payload_over_the_batch_limit_goes_alone_and_one_over_the_frame_limit_is_refused() {
        let mut batch = Batch::new(32, 64);
        let mut out = Vec::new();
        batch.push_publishes(run("a", 1, &["1"]), &mut out).unwrap();
        let big = format!("\"{}\"", "x".repeat(28)); // 16 + 34 = 50 bytes: over the batch limit, within the frame's
        batch
            .push_publishes(run("a", 2, &[&big, "3"]), &mut out)
            .unwrap();
        out.extend(batch.finish());
        let lens: Vec<usize> = out.iter().map(|f| f.len()).collect();
        assert_eq!(lens, [16 + 5, 50, 16 + 5]);
        assert_eq!(
            records_of(&out),
            vec![
                Record::Publish(run("a", 1, &["1"])),
                Record::Publish(run("a", 2, &[&big])),
                Record::Publish(run("a", 3, &["3"])),
            ]
        );
        let huge = format!("\"{}\"", "x".repeat(58));
        assert!(matches!(
            batch.push_publishes(run("a", 4, &[&huge]), &mut out),
            Err(TransportError::FrameTooLarge { size: 80, max: 64 })
        ));
    }

    #[test]
    fn a_recycled_buffer_holds_the_next_frame() {
        let mut batch = Batch::new(1 << 16, 1 << 20).with_headroom(14);
        let mut out = Vec::new();
        batch
            .push_publishes(run("a", 1, &["1"; 100]), &mut out)
            .unwrap();
        let mut first = batch.finish().unwrap();
        let at = first.as_ptr();
        // Written out: the socket's buffer is empty but keeps the allocation.
        first.advance(first.len());
        batch.recycle(first);
        batch
            .push_publishes(run("a", 101, &["1"; 100]), &mut out)
            .unwrap();
        let mut second = batch.finish().unwrap();
        assert_eq!(
            second.as_ptr(),
            at,
            "the recycled allocation holds the next frame"
        );
        assert_eq!(&second[..14], &[0u8; 14][..]);
        assert_eq!(records_of(&[second.split_off(14)]).len(), 1);
    }

    #[test]
    fn a_batch_reuses_its_encoding_buffer_across_frames() {
        let mut batch = Batch::new(1 << 16, 1 << 20);
        let mut out = Vec::new();
        batch
            .push_publishes(run("a", 1, &["1"; 100]), &mut out)
            .unwrap();
        let first = batch.finish().unwrap();
        let ptr = first.as_ptr();
        // The frame owns its buffer alone; handed back once written, it is reclaimed.
        batch.recycle(first);
        batch
            .push_publishes(run("a", 101, &["1"; 100]), &mut out)
            .unwrap();
        let second = batch.finish().unwrap();
        assert_eq!(second.as_ptr(), ptr, "the frame's buffer was reclaimed");
    }
}
