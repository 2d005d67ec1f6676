//! The client's WebSocket codec: actix-http's [`ws::Codec`] (client mode) for everything it
//! reads and for the frames it builds, plus one kind of frame it cannot build without a copy —
//! a v2 batch whose records were encoded behind room left for the frame header
//! ([`Batch::with_headroom`](crate::protocol::v2::Batch::with_headroom)).
//!
//! actix-http writes a binary message by copying its payload into the socket's write buffer
//! and masking it there. A batch is a frame's worth of records already in a buffer of its own,
//! so [`ClientCodec`] writes the header into the room in front of them, masks them in place,
//! and hands that buffer over as the socket's write buffer when the previous write has gone
//! out (copying it in behind what is still waiting otherwise): at 1 KiB per message that was
//! one copy of every published byte.

use std::cell::Cell;
use std::rc::Rc;

use actix_codec::{Decoder, Encoder};
use actix_http::ws;
use bytes::{Buf, BytesMut};

/// Where [`ClientCodec`] leaves the write buffer a batch replaced (the previous batch's, its
/// bytes all written), for the batch to build its next frame in: the same allocation goes
/// round instead of a fresh one per frame.
pub type Spare = Rc<Cell<Option<BytesMut>>>;

/// Room a batch leaves in front of its records: the longest client frame header (2 bytes,
/// an 8-byte extended length, a 4-byte masking key).
pub const FRAME_HEADROOM: usize = 14;

/// What the client writes: a message actix-http encodes, or a v2 batch.
#[derive(Debug)]
pub enum Outbound {
    /// Text, control frames, and anything else built by [`ws::Codec`].
    Message(ws::Message),
    /// One binary frame: [`FRAME_HEADROOM`] bytes of room, then the frame's payload.
    Batch(BytesMut),
}

/// [`ws::Codec`] in client mode for reading and for [`Outbound::Message`]; the batch frame of
/// [`Outbound::Batch`] without a copy.
pub struct ClientCodec {
    inner: ws::Codec,
    spare: Spare,
}

impl ClientCodec {
    /// Wraps `inner`, the codec of an established client connection (client mode: it masks);
    /// write buffers a batch replaces go to `spare`.
    pub fn new(inner: ws::Codec, spare: Spare) -> Self {
        ClientCodec { inner, spare }
    }
}

impl std::fmt::Debug for ClientCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCodec").finish_non_exhaustive()
    }
}

impl Decoder for ClientCodec {
    type Item = ws::Frame;
    type Error = ws::ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ws::Frame>, ws::ProtocolError> {
        self.inner.decode(src)
    }
}

impl Encoder<Outbound> for ClientCodec {
    type Error = ws::ProtocolError;

    fn encode(&mut self, item: Outbound, dst: &mut BytesMut) -> Result<(), ws::ProtocolError> {
        match item {
            Outbound::Message(message) => self.inner.encode(message, dst),
            Outbound::Batch(frame) => {
                let frame = masked_binary_frame(frame, rand::random());
                if dst.is_empty() {
                    // The previous write has gone out: this buffer becomes the write buffer,
                    // and the old one (empty) is kept for the next batch.
                    self.spare.set(Some(std::mem::replace(dst, frame)));
                } else {
                    dst.extend_from_slice(&frame);
                }
                Ok(())
            }
        }
    }
}

/// Turns `buf` ([`FRAME_HEADROOM`] bytes of room, then a payload) into one final, masked
/// binary frame (RFC 6455 §5.2–5.3), in place.
fn masked_binary_frame(mut buf: BytesMut, key: [u8; 4]) -> BytesMut {
    assert!(
        buf.len() >= FRAME_HEADROOM,
        "a batch frame starts with its headroom"
    );
    let len = buf.len() - FRAME_HEADROOM;
    // FIN + binary opcode; the mask bit with the length.
    let mut head = [0u8; FRAME_HEADROOM];
    head[0] = 0x80 | 0x2;
    let mut n = if len < 126 {
        head[1] = 0x80 | len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        head[1] = 0x80 | 126;
        head[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        head[1] = 0x80 | 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    head[n..n + 4].copy_from_slice(&key);
    n += 4;
    let start = FRAME_HEADROOM - n;
    buf[start..FRAME_HEADROOM].copy_from_slice(&head[..n]);
    apply_mask(&mut buf[FRAME_HEADROOM..], key);
    buf.advance(start);
    buf
}

/// XORs `bytes` with the repeated masking `key`, eight bytes at a time.
fn apply_mask(bytes: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = bytes.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so its index keeps the key's phase.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn batch_of(payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_bytes(0, FRAME_HEADROOM);
        buf.put_slice(payload);
        buf
    }

    /// What a server reads from `wire`: actix-http's parser (server side, which requires and
    /// removes the mask) is the reference.
    fn server_reads(wire: &mut BytesMut) -> (bool, ws::OpCode, Vec<u8>) {
        let (fin, op, payload) = ws::Parser::parse(wire, true, 1 << 24)
            .expect("a well-formed frame")
            .expect("a whole frame");
        (fin, op, payload.map(|p| p.to_vec()).unwrap_or_default())
    }

    #[test]
    fn batch_frames_read_back_as_the_same_bytes_at_every_length_encoding() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 127, 65_535, 65_536, 100_003] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let key = [0x5a, 0x01, 0xff, 0x80];
            let mut wire = masked_binary_frame(batch_of(&payload), key);
            let (fin, op, read) = server_reads(&mut wire);
            assert!(fin, "len {len}");
            assert_eq!(op, ws::OpCode::Binary, "len {len}");
            assert_eq!(read, payload, "len {len}");
            assert!(wire.is_empty(), "len {len}: nothing after the frame");
        }
    }

    #[test]
    fn a_batch_behind_a_waiting_write_is_appended_and_messages_still_encode() {
        let mut codec = ClientCodec::new(ws::Codec::new().client_mode(), Spare::default());
        let mut dst = BytesMut::new();
        codec
            .encode(Outbound::Message(ws::Message::Text("hi".into())), &mut dst)
            .unwrap();
        codec
            .encode(Outbound::Batch(batch_of(b"\x01\x02\x03")), &mut dst)
            .unwrap();
        codec
            .encode(Outbound::Batch(batch_of(&[9; 300])), &mut dst)
            .unwrap();
        let (_, op, text) = server_reads(&mut dst);
        assert_eq!((op, text.as_slice()), (ws::OpCode::Text, &b"hi"[..]));
        let (_, op, first) = server_reads(&mut dst);
        assert_eq!(
            (op, first.as_slice()),
            (ws::OpCode::Binary, &[1u8, 2, 3][..])
        );
        let (_, _, second) = server_reads(&mut dst);
        assert_eq!(second, vec![9; 300]);
        assert!(dst.is_empty());
    }

    #[test]
    fn into_an_empty_write_buffer_a_batch_goes_without_a_copy() {
        let spare = Spare::default();
        let mut codec = ClientCodec::new(ws::Codec::new().client_mode(), spare.clone());
        let batch = batch_of(&[7; 1000]);
        let payload_at = batch[FRAME_HEADROOM..].as_ptr();
        let mut dst = BytesMut::with_capacity(8 * 1024);
        let old_at = dst.as_ptr();
        codec.encode(Outbound::Batch(batch), &mut dst).unwrap();
        // The write buffer it replaced is left for the next batch.
        assert_eq!(spare.take().map(|b| b.as_ptr()), Some(old_at));
        // 1000 bytes take a 4-byte header and the 4-byte key in front of the payload.
        assert_eq!(dst[8..].as_ptr(), payload_at);
        let (_, _, read) = server_reads(&mut dst);
        assert_eq!(read, vec![7; 1000]);
    }

    #[test]
    fn masks_use_the_key_in_phase_whatever_the_length() {
        let key = [1, 2, 4, 8];
        for len in 0..40 {
            let mut bytes = vec![0u8; len];
            apply_mask(&mut bytes, key);
            let expected: Vec<u8> = (0..len).map(|i| key[i & 3]).collect();
            assert_eq!(bytes, expected, "len {len}");
        }
    }
}
