//! gRPC over HTTP/2 for the Workload API socket, on hyper directly: routing by path, the
//! request message read and decoded, and response messages framed one by one.
//!
//! Every workload keeps its connection and one stream open for as long as it runs, so what
//! an idle stream holds is most of what the agent holds. Here a stream keeps no encode
//! buffer: each message is framed into an allocation of its own, wiped and freed once
//! HTTP/2 has written it (tonic's server keeps a stream's last encoded message, private
//! key included, until the stream ends). Response headers are sent as never-indexed
//! literals, so they take no room in the connection's HPACK table either.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::metadata::MetadataMap;
use zeroize::Zeroizing;

use mayfly_proto::v1::workload_credentials_server::WorkloadCredentials;
use mayfly_proto::v1::workload_elevation_server::WorkloadElevation;
use mayfly_proto::v1::workload_secrets_server::WorkloadSecrets;
use mayfly_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;

use crate::workload_api::streams::ResponseStream;
use crate::workload_api::{PeerCredentials, WorkloadApi};

/// The largest request message accepted. Workload API requests are a few audiences or one
/// JWT-SVID; anything near this size is not a Workload API client.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX_LEN: usize = 5;

/// The methods served on the socket, by their HTTP/2 path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    FetchX509Svid,
    FetchX509Bundles,
    FetchJwtSvid,
    FetchJwtBundles,
    ValidateJwtSvid,
    WatchSecrets,
    GetCredential,
    RequestElevation,
    EndElevation,
}

impl Rpc {
    /// The method's name, as its metrics label.
    fn name(self) -> &'static str {
        match self {
            Self::FetchX509Svid => "FetchX509SVID",
            Self::FetchX509Bundles => "FetchX509Bundles",
            Self::FetchJwtSvid => "FetchJWTSVID",
            Self::FetchJwtBundles => "FetchJWTBundles",
            Self::ValidateJwtSvid => "ValidateJWTSVID",
            Self::WatchSecrets => "WatchSecrets",
            Self::GetCredential => "GetCredential",
            Self::RequestElevation => "RequestElevation",
            Self::EndElevation => "EndElevation",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/SpiffeWorkloadAPI/FetchX509SVID" => Self::FetchX509Svid,
            "/SpiffeWorkloadAPI/FetchX509Bundles" => Self::FetchX509Bundles,
            "/SpiffeWorkloadAPI/FetchJWTSVID" => Self::FetchJwtSvid,
            "/SpiffeWorkloadAPI/FetchJWTBundles" => Self::FetchJwtBundles,
            "/SpiffeWorkloadAPI/ValidateJWTSVID" => Self::ValidateJwtSvid,
            "/mayfly.v1.WorkloadSecrets/WatchSecrets" => Self::WatchSecrets,
            "/mayfly.v1.WorkloadCredentials/GetCredential" => Self::GetCredential,
            "/mayfly.v1.WorkloadElevation/RequestElevation" => Self::RequestElevation,
            "/mayfly.v1.WorkloadElevation/EndElevation" => Self::EndElevation,
            _ => return None,
        })
    }
}

/// Answers one HTTP/2 request from the workload whose credentials are `peer`.
pub(crate) async fn handle(
    api: &WorkloadApi,
    peer: Option<PeerCredentials>,
    request: http::Request<Incoming>,
) -> http::Response<GrpcBody> {
    if request.method() != Method::POST {
        let mut response = http::Response::new(GrpcBody::empty());
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !is_grpc {
        let mut response = http::Response::new(GrpcBody::empty());
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return response;
    }
    let Some(rpc) = Rpc::from_path(request.uri().path()) else {
        // One label for every unknown path: a caller must not mint series at will.
        api.metrics()
            .request_answered("other", tonic::Code::Unimplemented);
        return trailers_only(Status::unimplemented(format!(
            "{} is not a method of this Workload API",
            request.uri().path()
        )));
    };
    let deadline = match deadline(request.headers()) {
        Ok(deadline) => deadline,
        Err(status) => {
            api.metrics().request_answered(rpc.name(), status.code());
            return trailers_only(status);
        }
    };
    let call = dispatch(api, rpc, peer, request);
    let outcome = match deadline {
        Some(at) => tokio::time::timeout_at(at, call)
            .await
            .unwrap_or_else(|_| Err(deadline_exceeded())),
        None => call.await,
    };
    let code = outcome
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    api.metrics().request_answered(rpc.name(), code);
    match outcome {
        Ok(reply) => {
            let mut response = http::Response::new(GrpcBody::reply(reply, deadline));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, never_indexed("application/grpc"));
            response
        }
        Err(status) => trailers_only(status),
    }
}

/// What a call answers before its trailers: one message or a stream of them.
pub(crate) enum Reply {
    Message(Bytes),
    Stream(EncodedStream),
}

/// A response stream whose messages are already framed.
pub(crate) type EncodedStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

async fn dispatch(
    api: &WorkloadApi,
    rpc: Rpc,
    peer: Option<PeerCredentials>,
    request: http::Request<Incoming>,
) -> Result<Reply, Status> {
    let (parts, body) = request.into_parts();
    let message = read_message(body, parts.headers.get("grpc-encoding")).await?;
    let call = Call {
        metadata: MetadataMap::from_headers(parts.headers),
        peer,
        message,
    };
    match rpc {
        Rpc::FetchX509Svid => {
            stream_reply(SpiffeWorkloadApi::fetch_x509svid(api, call.decode()?).await?)
        }
        Rpc::FetchX509Bundles => {
            stream_reply(SpiffeWorkloadApi::fetch_x509_bundles(api, call.decode()?).await?)
        }
        Rpc::FetchJwtSvid => {
            message_reply(SpiffeWorkloadApi::fetch_jwtsvid(api, call.decode()?).await?)
        }
        Rpc::FetchJwtBundles => {
            stream_reply(SpiffeWorkloadApi::fetch_jwt_bundles(api, call.decode()?).await?)
        }
        Rpc::ValidateJwtSvid => {
            message_reply(SpiffeWorkloadApi::validate_jwtsvid(api, call.decode()?).await?)
        }
        Rpc::WatchSecrets => {
            stream_reply(WorkloadSecrets::watch_secrets(api, call.decode()?).await?)
        }
        Rpc::GetCredential => {
            message_reply(WorkloadCredentials::get_credential(api, call.decode()?).await?)
        }
        Rpc::RequestElevation => {
            message_reply(WorkloadElevation::request_elevation(api, call.decode()?).await?)
        }
        Rpc::EndElevation => {
            message_reply(WorkloadElevation::end_elevation(api, call.decode()?).await?)
        }
    }
}

/// A request as read off the wire, before its message is decoded into the method's type.
struct Call {
    metadata: MetadataMap,
    peer: Option<PeerCredentials>,
    message: Bytes,
}

impl Call {
    /// The request the service traits take, with the caller's credentials in its
    /// extensions.
    fn decode<T: Message + Default>(self) -> Result<tonic::Request<T>, Status> {
        let message = T::decode(self.message)
            .map_err(|e| Status::internal(format!("decoding the request: {e}")))?;
        let mut extensions = tonic::Extensions::new();
        if let Some(peer) = self.peer {
            extensions.insert(peer);
        }
        Ok(tonic::Request::from_parts(
            self.metadata,
            extensions,
            message,
        ))
    }
}

fn message_reply<M: Message>(response: tonic::Response<M>) -> Result<Reply, Status> {
    frame(&response.into_inner()).map(Reply::Message)
}

fn stream_reply<M: Message + 'static>(
    response: tonic::Response<ResponseStream<M>>,
) -> Result<Reply, Status> {
    let messages = response.into_inner();
    Ok(Reply::Stream(Box::pin(futures::StreamExt::map(
        messages,
        |item| item.and_then(|message| frame(&message)),
    ))))
}

/// Reads the request body: exactly one uncompressed message of at most
/// [`MAX_REQUEST_BYTES`], returned without its prefix.
async fn read_message(mut body: Incoming, encoding: Option<&HeaderValue>) -> Result<Bytes, Status> {
    let mut received = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::cancelled(format!("reading the request: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if received.len() + data.len() > PREFIX_LEN + MAX_REQUEST_BYTES {
            return Err(too_large());
        }
        received.extend_from_slice(&data);
    }
    unframe(received.freeze(), encoding)
}

/// The message of a request body read whole: one uncompressed, length-prefixed message of
/// at most [`MAX_REQUEST_BYTES`], without its prefix.
pub(crate) fn unframe(
    mut received: Bytes,
    encoding: Option<&HeaderValue>,
) -> Result<Bytes, Status> {
    if received.len() < PREFIX_LEN {
        return Err(Status::internal("the request carries no message"));
    }
    let compressed = received.get_u8();
    let len = received.get_u32() as usize;
    if compressed != 0 {
        let named = encoding
            .and_then(|v| v.to_str().ok())
            .unwrap_or("an unnamed encoding");
        let mut status = Status::unimplemented(format!(
            "the request is compressed with {named}; this Workload API accepts identity only"
        ));
        status.metadata_mut().insert(
            "grpc-accept-encoding",
            tonic::metadata::MetadataValue::from_static("identity"),
        );
        return Err(status);
    }
    if len > MAX_REQUEST_BYTES {
        return Err(too_large());
    }
    if received.len() != len {
        return Err(Status::internal(if received.len() < len {
            "the request message is cut short"
        } else {
            "the request carries more than one message"
        }));
    }
    Ok(received)
}

fn too_large() -> Status {
    Status::out_of_range(format!(
        "the request message is larger than {MAX_REQUEST_BYTES} bytes"
    ))
}

/// One message with its gRPC prefix, in an allocation of its own that is wiped when HTTP/2
/// has written it: an X509-SVID response carries private keys.
fn frame<M: Message>(message: &M) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let prefix_len = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted("a response message is over 4 GiB"))?;
    let mut framed = Zeroizing::new(Vec::with_capacity(PREFIX_LEN + len));
    framed.push(0);
    framed.extend_from_slice(&prefix_len.to_be_bytes());
    message
        .encode(&mut *framed)
        .map_err(|e| Status::internal(format!("encoding a response: {e}")))?;
    Ok(Bytes::from_owner(framed))
}

/// The call's deadline from `grpc-timeout` (digits and a unit: H, M, S, m, u or n).
pub(crate) fn deadline(headers: &HeaderMap) -> Result<Option<Instant>, Status> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    let invalid = || {
        Status::invalid_argument(format!(
            "grpc-timeout {value:?} is not 1 to 8 digits followed by H, M, S, m, u or n"
        ))
    };
    let text = value.to_str().map_err(|_| invalid())?;
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return Err(invalid()),
    };
    Ok(Some(Instant::now() + timeout))
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("the call's grpc-timeout passed")
}

/// A response that is only headers: the status of a call refused before any message.
fn trailers_only(status: Status) -> http::Response<GrpcBody> {
    let mut response = http::Response::new(GrpcBody::empty());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, never_indexed("application/grpc"));
    status_headers(&status, headers);
    response
}

/// `grpc-status`, `grpc-message` and the status's metadata, kept out of the HPACK table.
fn status_headers(status: &Status, headers: &mut HeaderMap) {
    if status.add_header(headers).is_err() {
        // Only metadata that cannot be a header gets here; the code and message still can.
        headers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    for value in headers.values_mut() {
        value.set_sensitive(true);
    }
}

fn never_indexed(value: &'static str) -> HeaderValue {
    let mut value = HeaderValue::from_static(value);
    value.set_sensitive(true);
    value
}

/// A gRPC response body: the framed messages, then the trailers with the call's status.
pub(crate) struct GrpcBody {
    state: BodyState,
    deadline: Option<Pin<Box<Sleep>>>,
}

/// Kept small: hyper holds a stream's body for as long as the stream is open.
enum BodyState {
    Message(Bytes),
    Stream(EncodedStream),
    /// `None` for OK.
    Trailers(Option<Box<Status>>),
    Done,
}

impl GrpcBody {
    fn empty() -> Self {
        Self {
            state: BodyState::Done,
            deadline: None,
        }
    }

    fn reply(reply: Reply, deadline: Option<Instant>) -> Self {
        let state = match reply {
            Reply::Message(bytes) => BodyState::Message(bytes),
            Reply::Stream(stream) => BodyState::Stream(stream),
        };
        Self {
            state,
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
        }
    }
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            if matches!(this.state, BodyState::Message(_) | BodyState::Stream(_)) {
                this.state = BodyState::Trailers(Some(Box::new(deadline_exceeded())));
            }
        }
        loop {
            match std::mem::replace(&mut this.state, BodyState::Done) {
                BodyState::Message(bytes) => {
                    this.state = BodyState::Trailers(None);
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                BodyState::Stream(mut stream) => match stream.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Ok(bytes))) => {
                        this.state = BodyState::Stream(stream);
                        return Poll::Ready(Some(Ok(Frame::data(bytes))));
                    }
                    Poll::Ready(Some(Err(status))) => {
                        this.state = BodyState::Trailers(Some(Box::new(status)));
                    }
                    Poll::Ready(None) => this.state = BodyState::Trailers(None),
                    Poll::Pending => {
                        this.state = BodyState::Stream(stream);
                        return Poll::Pending;
                    }
                },
                BodyState::Trailers(status) => {
                    this.deadline = None;
                    let mut trailers = HeaderMap::new();
                    match status {
                        Some(status) => status_headers(&status, &mut trailers),
                        None => {
                            trailers.insert("grpc-status", never_indexed("0"));
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                BodyState::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    /// Never exact, so that hyper adds no `content-length` to a headers-only answer.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_is_parsed_in_every_unit_and_refused_when_malformed() {
        let at = |text: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", text.parse().unwrap());
            deadline(&headers).map(|d| d.map(|d| d - Instant::now()))
        };
        let close = |d: Duration, want: Duration| d <= want && want - d < Duration::from_secs(1);
        assert!(close(at("2H").unwrap().unwrap(), Duration::from_secs(7200)));
        assert!(close(at("3M").unwrap().unwrap(), Duration::from_secs(180)));
        assert!(close(at("10S").unwrap().unwrap(), Duration::from_secs(10)));
        assert!(close(
            at("1500m").unwrap().unwrap(),
            Duration::from_millis(1500)
        ));
        assert!(at("99999999u").unwrap().is_some());
        assert!(at("5n").unwrap().is_some());
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S", "1 S"] {
            let error = at(bad).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(error.message().contains("grpc-timeout"), "{bad:?}");
        }
        assert!(deadline(&HeaderMap::new()).unwrap().is_none());
    }

    #[test]
    fn a_framed_message_is_its_prefix_and_its_encoding() {
        let message = mayfly_proto::workload::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: "spiffe://example.org/w".into(),
        };
        let framed = frame(&message).unwrap();
        assert_eq!(framed[0], 0);
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - PREFIX_LEN);
        assert_eq!(&framed[PREFIX_LEN..], message.encode_to_vec().as_slice());
    }

    #[test]
    fn every_method_of_the_workload_api_is_routed_and_nothing_else() {
        for (path, rpc) in [
            ("/SpiffeWorkloadAPI/FetchX509SVID", Rpc::FetchX509Svid),
            ("/SpiffeWorkloadAPI/FetchX509Bundles", Rpc::FetchX509Bundles),
            ("/SpiffeWorkloadAPI/FetchJWTSVID", Rpc::FetchJwtSvid),
            ("/SpiffeWorkloadAPI/FetchJWTBundles", Rpc::FetchJwtBundles),
            ("/SpiffeWorkloadAPI/ValidateJWTSVID", Rpc::ValidateJwtSvid),
            ("/mayfly.v1.WorkloadSecrets/WatchSecrets", Rpc::WatchSecrets),
        ] {
            assert_eq!(Rpc::from_path(path), Some(rpc));
        }
        for path in [
            "/SpiffeWorkloadAPI/FetchWITSVID",
            "/spiffeworkloadapi/FetchX509SVID",
            "/SpiffeWorkloadAPI/FetchX509SVID/",
            "/",
        ] {
            assert_eq!(Rpc::from_path(path), None, "{path}");
        }
    }
}
