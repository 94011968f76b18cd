//! The Workload API's protobuf codec for tonic: prost, with buffers sized to the message
//! instead of tonic's fixed 8 KiB, since a Workload API stream lives as long as its workload
//! and tonic keeps a stream's buffers for the stream's lifetime. The generated clients use
//! it (`mayfly-agent api`, `exec`, the bench); the agent's own server does not go through
//! tonic and frames each message itself (agent/src/workload_api/grpc.rs).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// Starting capacity of a stream's encode and decode buffers. The encoder reserves each
/// message's exact size before writing it, so this only needs to hold the 5-byte gRPC frame
/// header; a decode buffer grows to the largest message received.
const BUFFER_SIZE: usize = 0;

/// tonic's default: how much encoded data a stream gathers before handing it to HTTP/2.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// Named by the generated Workload API client and server (`codec_path` in build.rs).
#[derive(Debug, Clone)]
pub struct WorkloadCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for WorkloadCodec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for WorkloadCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ExactSizeEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ExactSizeEncoder {
            _message: PhantomData,
        }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}

/// Encodes a message into a buffer grown to exactly its size, so that the allocation a
/// stream keeps after sending is no larger than the last message.
#[derive(Debug, Clone)]
pub struct ExactSizeEncoder<T> {
    _message: PhantomData<T>,
}

impl<T: Message> Encoder for ExactSizeEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}
