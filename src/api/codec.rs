//! Codecs for bytes that are already protobuf-encoded: the subscriber stream
//! sends each event encoded once and shared by every subscriber, and typed
//! publishing (and the gRPC binding) passes payloads through untouched.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_prost::ProstDecoder;

use crate::pb::v1::{SubscriptionCommand, SubscriptionMessage};

/// Initial size of the buffer tonic decodes a subscriber's commands into. The
/// buffer is allocated for every stream when it opens and lives as long as the
/// stream; commands are a few dozen bytes, and a larger one grows it in steps of
/// this size. (tonic's default, 8 KiB, was half of an idle subscriber's memory.)
pub const COMMAND_BUFFER_BYTES: usize = 256;

/// Initial size of the buffer tonic encodes a subscriber's outbound messages
/// into, also allocated per stream. One event of a few hundred bytes fits; a
/// burst of ready events grows it (up to the yield threshold) and the next
/// buffer starts at this size again.
pub const OUTBOUND_BUFFER_BYTES: usize = 1024;

/// Bytes of ready messages batched into one write to the connection; tonic's default.
const OUTBOUND_YIELD_THRESHOLD: usize = 32 * 1024;

/// One message on a subscriber's stream.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A `SubscriptionMessage` encoded once and shared by every subscriber.
    Shared(Bytes),
    /// A message for this subscriber alone (acks, lagged).
    Own(SubscriptionMessage),
}

/// Decodes `SubscriptionCommand`s with prost and writes [`Outbound`] messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct SubscribeCodec;

impl Codec for SubscribeCodec {
    type Encode = Outbound;
    type Decode = SubscriptionCommand;
    type Encoder = OutboundEncoder;
    type Decoder = ProstDecoder<SubscriptionCommand>;

    fn encoder(&mut self) -> Self::Encoder {
        OutboundEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(
            COMMAND_BUFFER_BYTES,
            OUTBOUND_YIELD_THRESHOLD,
        ))
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct OutboundEncoder;

impl Encoder for OutboundEncoder {
    type Item = Outbound;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(OUTBOUND_BUFFER_BYTES, OUTBOUND_YIELD_THRESHOLD)
    }

    fn encode(&mut self, item: Outbound, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outbound::Shared(bytes) => {
                dst.put_slice(&bytes);
                Ok(())
            }
            Outbound::Own(message) => message
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding a subscriber message: {e}"))),
        }
    }
}

/// Passes message bytes through in both directions.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
