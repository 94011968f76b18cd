//! A unary gRPC client on h2 itself, for the signing load generator. A call is its HEADERS
//! and DATA frames queued together and sent in one write. tonic's channel (through hyper)
//! sends the HEADERS, waits for the stream to open before it may send the message, and
//! sends the message and its end as two more writes, with a task hop for each. The load
//! client shares the two cores with the daemon it measures, and used 40 µs of them a call
//! that way against 20 this way. The daemon sees the same requests either way; agents keep
//! tonic.

use anyhow::{Context, Result, bail, ensure};
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, StatusCode, Uri};

/// One mTLS HTTP/2 connection to a daemon's node API.
pub struct UnaryConnection {
    send: h2::client::SendRequest<Bytes>,
}

impl UnaryConnection {
    pub async fn open(addr: &str, config: rustls::ClientConfig) -> Result<Self> {
        let io = mayfly_common::tls::connect_stream(addr, config)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (send, connection) = h2::client::handshake(io)
            .await
            .context("HTTP/2 handshake")?;
        // The connection task ends when `send` is dropped or the daemon closes; its error
        // shows up on the next call.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { send })
    }

    /// Calls the method at `uri` with a message framed by [`frame`], and decodes the answer.
    pub async fn call<M: prost::Message + Default>(
        &mut self,
        uri: &Uri,
        framed: Bytes,
    ) -> Result<M> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        std::future::poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .context("connection closed")?;
        let (answer, mut body) = self
            .send
            .send_request(request, false)
            .context("sending the request")?;
        body.send_data(framed, true)
            .context("sending the message")?;

        let answer = answer.await.context("reading the answer")?;
        ensure!(
            answer.status() == StatusCode::OK,
            "HTTP status {}",
            answer.status()
        );
        // A trailers-only answer carries its status in the headers: an error.
        grpc_status(answer.headers())?;
        let mut body = answer.into_body();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.context("reading the answer's body")?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .context("reading the trailers")?
            .context("the answer has no trailers")?;
        ensure!(
            trailers.contains_key("grpc-status"),
            "the trailers carry no grpc-status"
        );
        grpc_status(&trailers)?;
        unframe(data.freeze())
    }
}

/// `message` as one gRPC length-prefixed message, uncompressed.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message
        .encode(&mut out)
        .expect("the buffer was sized for the message");
    out.freeze()
}

/// The one message a unary answer's body holds.
fn unframe<M: prost::Message + Default>(mut data: Bytes) -> Result<M> {
    ensure!(
        data.len() >= 5,
        "the answer's body is {} bytes, no message",
        data.len()
    );
    ensure!(
        data.get_u8() == 0,
        "the answer is compressed; none was asked for"
    );
    let len = data.get_u32() as usize;
    ensure!(
        data.len() == len,
        "the answer's message says {len} bytes and {} came",
        data.len()
    );
    M::decode(data).context("decoding the answer")
}

/// An error for a grpc-status other than 0 (OK); nothing when there is none.
fn grpc_status(headers: &http::HeaderMap) -> Result<()> {
    match headers.get("grpc-status") {
        None => Ok(()),
        Some(code) if code == "0" => Ok(()),
        Some(code) => bail!(
            "grpc-status {}: {}",
            code.to_str().unwrap_or("?"),
            headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_message_unframes_to_itself() {
        let message = mayfly_proto::v1::SignSvidsRequest {
            csrs: vec![mayfly_proto::v1::SvidCsr {
                entry_id: "e1".into(),
                csr: vec![1, 2, 3],
            }],
        };
        let framed = frame(&message);
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize,
            framed.len() - 5
        );
        let back: mayfly_proto::v1::SignSvidsRequest = unframe(framed).unwrap();
        assert_eq!(back, message);
    }

    #[test]
    fn a_short_or_compressed_body_is_refused() {
        let err = unframe::<mayfly_proto::v1::SignSvidsRequest>(Bytes::from_static(&[0, 0]));
        assert!(err.unwrap_err().to_string().contains("no message"));
        let err =
            unframe::<mayfly_proto::v1::SignSvidsRequest>(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert!(err.unwrap_err().to_string().contains("compressed"));
        let err =
            unframe::<mayfly_proto::v1::SignSvidsRequest>(Bytes::from_static(&[0, 0, 0, 0, 9, 1]));
        assert!(err.unwrap_err().to_string().contains("9 bytes"));
    }

    #[test]
    fn a_failing_status_names_its_code_and_message() {
        let mut headers = http::HeaderMap::new();
        assert!(grpc_status(&headers).is_ok());
        headers.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(grpc_status(&headers).is_ok());
        headers.insert("grpc-status", HeaderValue::from_static("7"));
        headers.insert("grpc-message", HeaderValue::from_static("evicted"));
        let err = grpc_status(&headers).unwrap_err().to_string();
        assert!(err.contains('7') && err.contains("evicted"), "{err}");
    }
}
